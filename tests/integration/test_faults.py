"""Faults with real processes: kill -9 the node and a worker, restart Redis, take the PACS away.

Every test runs the real programs (``l3spot serve``, ``l3spot worker``, a private
``redis-server`` without persistence, Orthanc as the PACS) and kills them with SIGKILL, then
checks what the issue asks for: nothing acknowledged is lost, every series is analysed once
(``attempts`` in its job record) or, after a killed worker, once more on another worker,
and the PACS holds exactly the result objects of each series, once. The series are small
phantoms (64 x 64 px): the tests depend on the flow, not on the locator's accuracy (L3
found or "not in field of view" both end ``done`` with an SR and an SC).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import redis as redis_client

from core.config import load_config
from core.jobs import (
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
)
from tests.conftest import require_shipped
from tests.support.node import (
    CLI,
    ORTHANC,
    REDIS_SERVER,
    STORESCU,
    OrthancPacs,
    StoreLog,
    free_port,
    kill_group,
    make_ct,
    phantom_datasets,
    result_sop_uids,
    send_datasets,
    start_node,
    start_orthanc,
    start_redis,
    start_worker,
    stop,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

FINAL = (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)


@pytest.fixture(autouse=True)
def _runtime() -> None:
    for prog in (STORESCU, ORTHANC, REDIS_SERVER):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (see .ci/run)")
    cfg = load_config(environ={k: v for k, v in os.environ.items() if k != "L3SPOT_CONFIG"})
    require_shipped(cfg.locator.weights, "locator weights")


def record(jobs: JobStore, series_uid: str) -> JobRecord | None:
    with contextlib.suppress(JobNotFoundError):
        return jobs.get(series_uid)
    return None


def wait_state(
    jobs: JobStore, series_uid: str, states: tuple[str, ...], timeout_s: float
) -> JobRecord:
    def ready() -> JobRecord | None:
        rec = record(jobs, series_uid)
        return rec if rec is not None and rec.state in states else None

    return wait_for(ready, timeout_s, f"series {series_uid} in {states}")


def logged_pids(log_path: Path, event: str) -> list[int]:
    pids = []
    for line in log_path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(ValueError, KeyError):
                pids.append(int(json.loads(line)["pid"]))
    return pids


def failed_enqueues(log_path: Path) -> str:
    return "\n".join(
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if "enqueue_failed" in line
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    return False


def assert_pacs_holds_exactly(pacs: OrthancPacs, study_uid: str, results: Path) -> None:
    """The PACS has each result object of the series once, and nothing else in the study."""
    expected = result_sop_uids(results)
    assert len(expected) >= 2  # SR and SC, plus the SEG when L3 was found
    assert sorted(pacs.sop_uids_of_study(study_uid)) == expected


@pytest.fixture()
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_redis(port, tmp_path / "redis.log")
    yield port
    kill_group(proc)


def fast_broker(url: str | None = None, **extra: object) -> dict[str, object]:
    """Broker settings with short fault-detection delays (seconds)."""
    return {
        "url": url,
        "visibility_timeout_seconds": 4,
        "heartbeat_seconds": 0.5,
        "reconcile_interval_seconds": 0.5,
        "stale_queued_seconds": 3,
        "stale_running_seconds": 3,
        **extra,
    }


def pacs_export(port: int, **extra: object) -> dict[str, object]:
    return {
        "destinations": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}],
        "max_attempts": 3,
        "backoff_initial_seconds": 0.5,
        "backoff_max_seconds": 1,
        "timeout_seconds": 5,
        **extra,
    }


# ---------------------------------------------------------------------------- 1. the node


def test_node_killed_mid_association_loses_nothing_acknowledged_and_analyses_once(
    tmp_path: Path,
) -> None:
    datasets = phantom_datasets(101, 40)
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    port = free_port()
    spool = tmp_path / "var" / "spool"
    # stable time longer than the scanner's reconnect after the crash
    cfg = write_config(tmp_path / "config.yaml", spool, port, node={"series_stable_seconds": 6})
    log_path = tmp_path / "node.log"
    node = start_node(cfg, log_path, port)
    workers = wait_for(lambda: logged_pids(log_path, "worker_started"), 30, "child workers")
    sent = StoreLog()
    sender = threading.Thread(target=send_datasets, args=(datasets, port, sent))
    sender.start()
    wait_for(lambda: len(sent.acknowledged) >= 12, 60, "12 acknowledged instances", 0.005)
    os.kill(node.pid, signal.SIGKILL)  # the node only: its workers must follow by themselves
    node.wait()
    sender.join(60)
    acked = sent.acknowledged
    assert sent.error is not None and 12 <= len(acked) < len(datasets)
    wait_for(lambda: not any(alive(p) for p in workers), 30, "orphan workers to exit")

    # every acknowledged instance is on disk, intact (same UIDs, same pixels)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    series_dir = spool / study / series
    for uid in acked:
        stored = pydicom.dcmread(series_dir / f"{uid}.dcm")
        assert stored.SOPInstanceUID == uid and stored.SeriesInstanceUID == series
        assert stored.PixelData == by_uid[uid].PixelData

    # restart: the scanner sends again from the first unacknowledged instance
    node = start_node(cfg, log_path, port)
    try:
        rest = datasets[len(acked) :]
        again = send_datasets(rest, port)
        assert again.error is None and len(again.acknowledged) == len(rest)
        rec = wait_state(JobStore(spool), series, FINAL, 90)
        assert rec.state == JobState.DONE, rec.reason
        assert rec.attempts == 1 and rec.n_instances == len(datasets)
        assert sorted(p.name for p in series_dir.glob("*.dcm")) == sorted(
            f"{ds.SOPInstanceUID}.dcm" for ds in datasets
        )
        results_root = tmp_path / "var" / "results"
        assert [p.name for p in results_root.iterdir()] == [series]  # one set, no leftovers
        assert len(result_sop_uids(results_root / series)) >= 2
    finally:
        stop(node)


# ---------------------------------------------------------------------------- 2. a worker


def test_worker_killed_mid_analysis_reruns_on_another_worker_and_pacs_gets_one_copy(
    tmp_path: Path, redis_port: int
) -> None:
    pacs = start_orthanc(tmp_path / "orthanc")
    port = free_port()
    spool = tmp_path / "var" / "spool"
    cfg = write_config(
        tmp_path / "config.yaml",
        spool,
        port,
        broker=fast_broker(f"redis://127.0.0.1:{redis_port}/0"),
        export=pacs_export(pacs.dicom),
    )
    node = start_node(cfg, tmp_path / "node.log", port)
    workers = [start_worker(cfg, tmp_path / f"w{i}.log", f"w{i}") for i in (1, 2)]
    try:
        datasets = phantom_datasets(102, 120, size=128)  # long enough to be killed mid-task
        study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
        assert len(send_datasets(datasets, port).acknowledged) == len(datasets)
        jobs = JobStore(spool)
        rec = wait_state(jobs, series, (JobState.ANALYSING, *FINAL), 60)
        assert rec.state == JobState.ANALYSING and rec.worker, "analysis finished before the kill"
        pid = int(rec.worker.rsplit("/", 1)[1])
        victim = next(w for w in workers if os.getpgid(pid) == w.pid)
        kill_group(victim)  # the worker's main process and its pool child, SIGKILL
        rec = wait_state(jobs, series, FINAL, 90)
        assert rec.state == JobState.DONE, rec.reason
        assert rec.attempts == 2  # the killed run, then one run on the other worker
        survivor = next(w for w in workers if w is not victim)
        assert os.getpgid(int(rec.worker.rsplit("/", 1)[1])) == survivor.pid
        assert rec.exports and rec.exports[0].state == "done"
        assert_pacs_holds_exactly(pacs, study, tmp_path / "var" / "results" / series)
    finally:
        for w in workers:
            stop(w)
        stop(node)
        kill_group(pacs.proc)


# ---------------------------------------------------------------------------- 3. Redis


def test_redis_restarted_empty_loses_no_job(tmp_path: Path) -> None:
    redis_port, port = free_port(), free_port()
    redis = start_redis(redis_port, tmp_path / "redis.log")
    spool = tmp_path / "var" / "spool"
    cfg = write_config(
        tmp_path / "config.yaml",
        spool,
        port,
        broker=fast_broker(f"redis://127.0.0.1:{redis_port}/0", socket_timeout_seconds=2),
        # below the 4 s visibility timeout (the configuration refuses a longer wait)
        export={"backoff_max_seconds": 2},
    )
    node = start_node(cfg, tmp_path / "node.log", port)
    worker = None
    jobs = JobStore(spool)
    try:
        # B is queued in Redis (no worker runs yet); Redis dies and comes back empty
        b = phantom_datasets(103, 30)
        assert len(send_datasets(b, port).acknowledged) == len(b)
        client = redis_client.Redis(host="127.0.0.1", port=redis_port)
        wait_for(lambda: client.llen("analysis") > 0, 30, "B's message in Redis")
        client.close()
        kill_group(redis)
        # D completes while Redis is down: the publish fails, the record stays queued
        d = phantom_datasets(104, 30)
        assert len(send_datasets(d, port).acknowledged) == len(d)
        wait_for(
            lambda: str(d[0].SeriesInstanceUID) in failed_enqueues(tmp_path / "node.log"),
            30,
            "D's failed publish",
        )
        assert record(jobs, str(d[0].SeriesInstanceUID)).state == JobState.QUEUED  # type: ignore[union-attr]
        redis = start_redis(redis_port, tmp_path / "redis.log")
        worker = start_worker(cfg, tmp_path / "worker.log", "w1")
        for ds in (b, d):
            rec = wait_state(jobs, str(ds[0].SeriesInstanceUID), FINAL, 90)
            assert rec.state == JobState.DONE, rec.reason
            assert rec.attempts == 1
            # B's message was lost with Redis: only the reconciliation brings it back; D's
            # refused publish is re-sent by the watcher or the reconciliation, whichever first
            assert rec.requeues >= 1 or ds is d
        assert '"series_requeued"' in (tmp_path / "node.log").read_text()
    finally:
        if worker is not None:
            stop(worker)
        stop(node)
        kill_group(redis)


# ---------------------------------------------------------------------------- 4. the PACS


def test_pacs_down_delivers_when_back_then_fails_after_n_attempts_and_retry_delivers(
    tmp_path: Path,
) -> None:
    pacs_port, port = free_port(), free_port()
    spool = tmp_path / "var" / "spool"
    cfg = write_config(
        tmp_path / "config.yaml",
        spool,
        port,
        broker=fast_broker(None, stale_running_seconds=30),
        export=pacs_export(pacs_port, max_attempts=4, backoff_initial_seconds=1),
    )
    node = start_node(cfg, tmp_path / "node.log", port)
    jobs = JobStore(spool)
    pacs = None
    try:
        # A: the PACS stays down through all attempts -> failed, with what the PACS did
        a = phantom_datasets(105, 30)
        a_series = str(a[0].SeriesInstanceUID)
        assert len(send_datasets(a, port).acknowledged) == len(a)
        rec = wait_state(jobs, a_series, FINAL, 90)
        assert rec.state == JobState.FAILED
        assert "failed after 4 attempts" in (rec.reason or "")
        assert "connection refused by 127.0.0.1" in (rec.reason or "")  # the true reason
        assert rec.exports[0].attempts == 4 and rec.exports[0].state == "failed"
        # B: the PACS comes back between two attempts -> delivered, once
        b = phantom_datasets(106, 30)
        b_series = str(b[0].SeriesInstanceUID)
        assert len(send_datasets(b, port).acknowledged) == len(b)
        wait_for(
            lambda: (
                (r := record(jobs, b_series)) is not None
                and r.exports
                and r.exports[0].attempts >= 1
            ),
            90,
            "a failed delivery attempt of B",
        )
        pacs = start_orthanc(tmp_path / "orthanc", dicom_port=pacs_port)
        rec = wait_state(jobs, b_series, FINAL, 60)
        assert rec.state == JobState.DONE, rec.reason
        assert 2 <= rec.exports[0].attempts <= 4
        assert_pacs_holds_exactly(
            pacs, str(b[0].StudyInstanceUID), spool.parent / "results" / b_series
        )
        # A again: l3spot retry sends the stored results, no re-analysis
        assert not pacs.sop_uids_of_study(str(a[0].StudyInstanceUID))
        out = subprocess.run(
            [*CLI, "retry", a_series, "--config", str(cfg)], capture_output=True, text=True
        )
        assert out.returncode == 0 and "export re-queued" in out.stdout, out.stderr
        rec = wait_state(jobs, a_series, FINAL, 60)
        assert rec.state == JobState.DONE and rec.attempts == 1, rec.reason
        assert_pacs_holds_exactly(
            pacs, str(a[0].StudyInstanceUID), spool.parent / "results" / a_series
        )
    finally:
        stop(node)
        if pacs is not None:
            kill_group(pacs.proc)


# ---------------------------------------------------------------------------- 5. bad series


def _spool_series(spool: Path, datasets: list[pydicom.Dataset]) -> tuple[str, Path]:
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    folder = spool / study / series
    folder.mkdir(parents=True)
    for ds in datasets:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    JobStore(spool).mark_received(series, study, folder)
    return series, folder


def test_series_that_cannot_be_analysed_end_failed_and_the_worker_keeps_serving(
    tmp_path: Path,
) -> None:
    port = free_port()
    spool = tmp_path / "var" / "spool"
    cfg = write_config(tmp_path / "config.yaml", spool, port)
    log_path = tmp_path / "node.log"
    node = start_node(cfg, log_path, port)
    jobs = JobStore(spool)
    try:
        # spooled, then deleted / corrupted before the worker reads them; a sagittal series
        gone, gone_dir = _spool_series(spool, phantom_datasets(107, 20))
        shutil.rmtree(gone_dir)
        gone_dir.mkdir()
        broken, broken_dir = _spool_series(spool, phantom_datasets(108, 20))
        for f in sorted(broken_dir.glob("*.dcm"))[::2]:
            f.write_bytes(f.read_bytes()[:300])  # truncated mid-header
        for f in sorted(broken_dir.glob("*.dcm"))[1::2]:
            f.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(2000))  # garbage after the magic
        study = pydicom.uid.generate_uid()
        sagittal_series = pydicom.uid.generate_uid()
        sagittal = [
            make_ct(study, sagittal_series, i, orientation=(0, 1, 0, 0, 0, -1), size=32)
            for i in range(20)
        ]
        sag, _ = _spool_series(spool, sagittal)
        for uid in (gone, broken, sag):
            out = subprocess.run(
                [*CLI, "retry", uid, "--analysis", "--config", str(cfg)],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
        for uid in (gone, broken, sag):
            rec = wait_state(jobs, uid, FINAL, 90)
            assert rec.state == JobState.FAILED and rec.attempts == 1
            assert rec.reason and len(rec.reason) > 10
        # the same worker then analyses a good series sent over the network
        good = phantom_datasets(109, 30)
        assert len(send_datasets(good, port).acknowledged) == len(good)
        rec = wait_state(jobs, str(good[0].SeriesInstanceUID), FINAL, 90)
        assert rec.state == JobState.DONE, rec.reason
        assert '"worker_exited"' not in log_path.read_text()
        assert len(logged_pids(log_path, "worker_started")) == 2  # analysis + export, once
    finally:
        stop(node)
