"""The whole node with real peers: dcmtk storescu -> l3spot serve -> workers -> Orthanc.

Real programs only: ``/usr/bin/storescu`` (dcmtk) is the scanner, ``l3spot serve`` and
``l3spot worker`` run as subprocesses with a test config file, Orthanc is the PACS (checked
through its REST API), redis-server is the production broker. The same flow runs once with
Redis (three series: phantom, real abdomen, real chest) and once with the embedded default
(one series).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import load_config
from core.jobs import JobNotFoundError, JobState, JobStore
from tests.conftest import require_shipped
from tests.support.node import OrthancPacs, free_port, start_orthanc, write_series

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"
REDIS_DB = 13  # dedicated to these tests; only this DB is flushed
SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4")
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
L3_NOT_IN_FOV = "L3 not in field of view"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _require_runtime() -> None:
    for prog in (STORESCU, ORTHANC):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (see .ci/run)")
    weights = load_config(environ={k: v for k, v in os.environ.items() if k != "L3SPOT_CONFIG"})
    require_shipped(weights.locator.weights, "locator weights")


# ---------------------------------------------------------------------------- OrthancPacs


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM by PID, wait for the exit (SIGKILL after ``timeout_s``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPacs]:
    _require_runtime()
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    stop_process(pacs.proc)


# ---------------------------------------------------------------------------- the node


@dataclass
class RunningNode:
    config_path: Path
    port: int
    jobs: JobStore


@contextlib.contextmanager
def run_node(
    tmp: Path,
    broker_url: str | None,
    pacs: OrthancPacs | None,
    min_slices: int = 20,
    database_url: str | None = None,
) -> Iterator[RunningNode]:
    """``l3spot serve`` (plus ``l3spot worker`` for Redis) with a 2 s stable time; the job
    records in the spool's SQLite, or in the PostgreSQL ``database_url``."""
    port = free_port()
    cfg = {
        "node": {
            "ae_title": "L3SPOT",
            "host": "127.0.0.1",
            "port": port,
            "spool_dir": str(tmp / "var" / "spool"),
            "series_stable_seconds": 2,
            "watcher_interval_seconds": 0.2,
            "min_slices": min_slices,
        },
        "broker": {"url": broker_url},
        "export": {
            "destinations": []
            if pacs is None
            else [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom}],
            "max_attempts": 3,
            "backoff_initial_seconds": 1,
        },
        "jobs": {"database_url": database_url},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "l3spot"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT__BROKER")}
    logs = open(tmp / "node.log", "wb")  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen([*cli, "serve", "--config", str(path)], stdout=logs, stderr=logs, env=env)
    ]
    if broker_url is not None:
        procs.append(
            subprocess.Popen(
                [*cli, "worker", "--config", str(path), "--queues", "analysis,export"],
                stdout=logs,
                stderr=logs,
                env=env,
            )
        )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*cli, "echo", "--config", str(path)], capture_output=True).returncode:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start: {(tmp / 'node.log').read_text()[-3000:]}")
            time.sleep(0.5)
        jobs = JobStore(tmp / "var" / "spool", database_url=database_url)
        yield RunningNode(path, port, jobs)
    finally:
        for p in procs:
            stop_process(p)
        logs.close()


def send(folder: Path, port: int) -> None:
    out = subprocess.run(
        [
            STORESCU,
            "-aet",
            "SCANNER",
            "-aec",
            "L3SPOT",
            "127.0.0.1",
            str(port),
            "+sd",
            "+sp",
            "*.dcm",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=NODELAY,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def wait_final(node: RunningNode, series_uid: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(JobNotFoundError):
            rec = node.jobs.get(series_uid)
            if rec.state in (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE):
                return rec
        time.sleep(0.25)
    raise AssertionError(f"series {series_uid} not finished after {timeout_s} s")


# ---------------------------------------------------------------------------- the inputs


@dataclass
class Case:
    folder: Path
    study_uid: str
    series_uid: str
    patient_id: str


def _case_from_folder(folder: Path) -> Case:
    import pydicom

    first = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
    return Case(folder, first.StudyInstanceUID, first.SeriesInstanceUID, str(first.PatientID))


def abdomen_case(shared: Path, out: Path, seed: str) -> Case:
    from worker.volume.load import load_series
    from worker.volume.write import write_ct_series

    vol = load_series(shared / "abdomen_ct_totalseg" / "ct.nii.gz")
    write_ct_series(vol, out, uid_seed=seed, series_description="ABDOMEN TOTALSEG")
    return _case_from_folder(out)


def phantom_case(out: Path, seed: int) -> Case:
    from worker.phantom import generate_phantom
    from worker.volume.write import write_ct_series

    write_ct_series(generate_phantom(seed=seed).volume, out, uid_seed=f"l3spot-it-phantom-{seed}")
    return _case_from_folder(out)


def assert_results_in_pacs(pacs: OrthancPacs, case: Case, with_seg: bool) -> None:
    series = pacs.series_of_study(case.study_uid)
    by_class: dict[str, dict[str, Any]] = {}
    for s in series:
        tags = pacs.tags(s)
        by_class[str(tags.get("SOPClassUID"))] = {"series": s, "tags": tags}
    sr = next((v for k, v in by_class.items() if k.startswith("1.2.840.10008.5.1.4.1.1.88.")), None)
    sc = next((v for k, v in by_class.items() if k in SC_CLASSES), None)
    assert sr is not None and sc is not None, sorted(by_class)
    results = [sr, sc]
    seg = by_class.get(SEG_CLASS)
    if with_seg:
        assert seg is not None, sorted(by_class)
        results.append(seg)
        ref = seg["tags"]["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]
        assert ref == case.series_uid
        # the SR references the SEG and the source images
        sr_text = json.dumps(sr["tags"])
        assert seg["tags"]["SOPInstanceUID"] in sr_text
    else:
        assert seg is None
    assert case.series_uid in json.dumps(sr["tags"])
    parents = {r["series"]["ParentStudy"] for r in results}
    assert len(parents) == 1  # same study in the PACS (same patient module, same Study UID)
    for r in results:
        assert r["tags"]["StudyInstanceUID"] == case.study_uid
        assert r["tags"]["PatientID"] == case.patient_id


# ---------------------------------------------------------------------------- the tests


def test_serve_alone_queues_eligible_series_to_its_own_worker(tmp_path: Path) -> None:
    """Embedded default, no weights or PACS needed: SCP -> watcher -> queue -> child worker."""
    if not os.access(STORESCU, os.X_OK):
        pytest.skip(f"{STORESCU} not installed (see .ci/run)")
    _, short_series, short = write_series(tmp_path / "in" / "short", 3)
    _, series, folder = write_series(tmp_path / "in" / "ok", 6)
    with run_node(tmp_path, None, None, min_slices=5) as node:
        send(short, node.port)
        send(folder, node.port)
        rec = wait_final(node, short_series, 30)
        assert rec.state == JobState.INELIGIBLE and "fewer than node.min_slices=5" in (
            rec.reason or ""
        )
        assert rec.n_instances == 3
        # the eligible one reaches the worker: analysed, or failed with a reason (a 16 x 16
        # toy series, or no trained weights here); either way exactly one attempt
        rec = wait_final(node, series, 90)
        assert rec.attempts == 1 and rec.analysis_started_at is not None
        assert rec.state == JobState.DONE or rec.reason
        cli = [sys.executable, "-m", "l3spot"]
        out = subprocess.run(
            [*cli, "retry", series, "--config", str(node.config_path)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and "analysis re-queued" in out.stdout
        deadline = time.monotonic() + 60
        while node.jobs.get(series).attempts < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert wait_final(node, series, 60).attempts == 2
    assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 9


@pytest.fixture()
def redis_url() -> str:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        pytest.skip("redis-server not running on 127.0.0.1:6379 (see .ci/run)")
    return f"redis://127.0.0.1:6379/{REDIS_DB}"


def test_redis_node_analyses_phantom_abdomen_and_chest_and_returns_results(
    orthanc: OrthancPacs, redis_url: str, shared_data: Path, tmp_path: Path
) -> None:
    abdomen = abdomen_case(shared_data, tmp_path / "in" / "abdomen", "l3spot-it-redis-abdomen")
    phantom = phantom_case(tmp_path / "in" / "phantom", seed=7)
    chest = _case_from_folder(shared_data / "chest_ct_lidc")
    with run_node(tmp_path, redis_url, orthanc) as node:
        for case in (phantom, abdomen, chest):
            send(case.folder, node.port)
        rec = wait_final(node, abdomen.series_uid, 150)
        assert rec.state == JobState.DONE, rec.reason
        assert_results_in_pacs(orthanc, abdomen, with_seg=True)
        rec = wait_final(node, phantom.series_uid, 60)
        assert rec.state == JobState.DONE, rec.reason
        assert_results_in_pacs(orthanc, phantom, with_seg=True)
        rec = wait_final(node, chest.series_uid, 150)
        assert rec.state == JobState.DONE, rec.reason
        assert rec.note == L3_NOT_IN_FOV
        assert rec.n_instances == 275
        assert_results_in_pacs(orthanc, chest, with_seg=False)
        listing = subprocess.run(
            [sys.executable, "-m", "l3spot", "jobs", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
        )
        assert L3_NOT_IN_FOV in listing.stdout and abdomen.series_uid in listing.stdout


def test_node_and_worker_share_the_spool_and_a_postgresql_job_store(
    orthanc: OrthancPacs, redis_url: str, postgres_url: Any, tmp_path: Path
) -> None:
    """Issue 18, several hosts: the node and a separate worker process (as on two hosts
    sharing the spool over NFS) keep the job records in PostgreSQL, not in the spool; a
    phantom series goes from the scanner to the PACS, and ``l3spot jobs`` reads it back."""
    from tests.support.postgres import empty_tables

    empty_tables(postgres_url)
    url = postgres_url.render_as_string(hide_password=False)
    phantom = phantom_case(tmp_path / "in" / "phantom", seed=11)
    with run_node(tmp_path, redis_url, orthanc, database_url=url) as node:
        send(phantom.folder, node.port)
        rec = wait_final(node, phantom.series_uid, 120)
        assert rec.state == JobState.DONE, rec.reason
        assert rec.worker and rec.exports[0].state == "done"
        assert_results_in_pacs(orthanc, phantom, with_seg=True)
        listing = subprocess.run(
            [sys.executable, "-m", "l3spot", "jobs", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
        )
        assert phantom.series_uid in listing.stdout and "done" in listing.stdout
    assert not (tmp_path / "var" / "spool" / "jobs.sqlite").exists()
    started = next(
        json.loads(line)
        for line in (tmp_path / "node.log").read_text().splitlines()
        if '"node_started"' in line
    )
    assert started["jobs"] == url


def test_embedded_node_runs_alone_and_returns_results(
    orthanc: OrthancPacs, shared_data: Path, tmp_path: Path
) -> None:
    abdomen = abdomen_case(shared_data, tmp_path / "in" / "abdomen", "l3spot-it-embedded-abdomen")
    with run_node(tmp_path, None, orthanc) as node:
        send(abdomen.folder, node.port)
        rec = wait_final(node, abdomen.series_uid, 150)
        assert rec.state == JobState.DONE, rec.reason
        assert rec.exports[0].state == "done"
        assert_results_in_pacs(orthanc, abdomen, with_seg=True)
        assert (tmp_path / "var" / "results" / abdomen.series_uid / "result.json").is_file()


def _sr_areas(pacs: OrthancPacs, study_uid: str) -> list[float]:
    """The Area (SCT 42798000, cm2) values of the SR Orthanc holds in the study, in order."""
    import io

    import pydicom

    sr = next(
        s
        for s in pacs.series_of_study(study_uid)
        if str(pacs.tags(s).get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.88.")
    )
    ds = pydicom.dcmread(io.BytesIO(pacs.file(sr["Instances"][0])))
    areas: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "NUM" and name and name[0].CodeValue == "42798000":
                areas.append(float(item.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return areas


def test_prone_and_feet_first_series_give_the_supine_numbers_in_the_pacs_sr(
    orthanc: OrthancPacs, shared_data: Path, tmp_path: Path
) -> None:
    """Issue 14, defect 1: the real case stored HFP gave SMA 63 cm2 instead of 139.5."""
    from tests.support.orientation import stored_as
    from worker.volume.load import load_series
    from worker.volume.write import write_ct_series

    volume = load_series(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz")
    cases = {}
    for storage in ("HFS", "HFP", "FFS"):
        stored, position = stored_as(volume, storage)
        folder = tmp_path / "in" / storage
        write_ct_series(
            stored, folder, uid_seed=f"l3spot-it-orientation-{storage}", patient_position=position
        )
        cases[storage] = _case_from_folder(folder)
    with run_node(tmp_path, None, orthanc) as node:
        for case in cases.values():
            send(case.folder, node.port)
        for storage, case in cases.items():
            rec = wait_final(node, case.series_uid, 150)
            assert rec.state == JobState.DONE, (storage, rec.reason)
            assert_results_in_pacs(orthanc, case, with_seg=True)
        areas = {s: _sr_areas(orthanc, c.study_uid) for s, c in cases.items()}
    assert len(areas["HFS"]) >= 4 and areas["HFS"][0] == pytest.approx(139.5, abs=1.0)
    for storage in ("HFP", "FFS"):
        assert areas[storage] == pytest.approx(areas["HFS"], rel=0.01, abs=0.05), storage
