"""Helpers shared by the node's tests: tiny CT datasets, free ports, real processes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from worker.export import guard_scu_reactor

PATIENT_NAME = "Doe^Secret"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ct(
    study_uid: str,
    series_uid: str,
    index: int = 0,
    *,
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    description: str = "ABDOMEN",
    size: int = 16,
) -> Dataset:
    """One small CT Image Storage dataset (size x size int16 pixels), file meta included."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "SECRET-ID-42"
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.SeriesDescription = description
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 2.0]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    pixels = (np.arange(size * size, dtype=np.int16).reshape(size, size) + index).astype(np.int16)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_series(folder: Path, n: int, **kwargs: object) -> tuple[str, str, Path]:
    """Write ``n`` slices of a new series under ``folder``; returns (study, series, folder)."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = make_ct(study, series, i, **kwargs)  # type: ignore[arg-type]
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return study, series, folder


# ---------------------------------------------------------------------------- real processes
# Helpers for tests and benches that run the node, workers, Redis and Orthanc as real
# processes (tests/test_faults.py, tests/test_load.py, bench/bench_load.py).

STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"
#: Debian's ``orthanc-dicomweb`` plugin (QIDO-RS, WADO-RS, STOW-RS under /dicom-web/).
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REDIS_SERVER = "/usr/bin/redis-server"
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
CLI = [sys.executable, "-m", "l3spot"]


def phantom_datasets(seed: int, n_slices: int, size: int = 64) -> list[Dataset]:
    """A small abdomen-pelvis phantom as ``n_slices`` CT datasets (deterministic UIDs).

    ``size`` x ``size`` pixels of 448 / ``size`` mm; the slice thickness is chosen so that
    the field of view covers the abdomen and pelvis, then the volume is cut to exactly
    ``n_slices`` (inferior first). The pipeline analyses it in about a second.
    """
    import dataclasses
    import tempfile

    import pydicom

    from worker.phantom import PhantomSpec, generate_phantom
    from worker.volume.write import write_ct_series

    spec = PhantomSpec(
        rows=size,
        cols=size,
        pixel_spacing_mm=448.0 / size,
        fov="abdomen_pelvis",
        slice_thickness_mm=max(0.5, 430.0 / n_slices),
        with_labels=False,
    )
    vol = generate_phantom(seed, spec).volume
    while vol.hu.shape[0] < n_slices:  # short patient: thinner slices
        spec = dataclasses.replace(spec, slice_thickness_mm=spec.slice_thickness_mm * 0.9)
        vol = generate_phantom(seed, spec).volume
    vol = dataclasses.replace(vol, hu=vol.hu[:n_slices], z_mm=vol.z_mm[:n_slices])
    with tempfile.TemporaryDirectory() as tmp:
        write_ct_series(vol, Path(tmp), uid_seed=f"l3spot-test-phantom-{seed}-{n_slices}-{size}")
        return [pydicom.dcmread(f) for f in sorted(Path(tmp).glob("*.dcm"))]


def write_config(path: Path, spool_dir: Path, port: int, **sections: dict[str, Any]) -> Path:
    """Write a test ``config.yaml``: short stable time, local ports, given section overrides."""
    cfg: dict[str, Any] = {
        "node": {
            "ae_title": "L3SPOT",
            "host": "127.0.0.1",
            "port": port,
            "spool_dir": str(spool_dir),
            "series_stable_seconds": 1,
            "watcher_interval_seconds": 0.2,
            "min_slices": 10,
            "min_free_disk_mb": 0,
            "max_associations": 20,
        },
        "broker": {"url": None},
        "export": {"destinations": []},
        "logging": {"level": "INFO"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Popen[bytes]:
    """Start a process in its own session (so :func:`kill_group` reaches its children)."""
    with open(log_path, "ab") as log:
        return Popen(args, stdout=log, stderr=log, env=env or NODELAY_ENV, start_new_session=True)


def kill_group(proc: Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group of ``proc`` (started by :func:`spawn`), then reap."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: Popen[bytes], timeout_s: float = 20) -> None:
    """SIGTERM the process (Celery warm shutdown, node stop), SIGKILL its group after a while."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, step: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(step)


def echo_ok(port: int, timeout_s: float = 2.0) -> bool:
    """True when a C-ECHO to ``L3SPOT`` on 127.0.0.1:``port`` succeeds."""
    from core.echo import echo_scp

    return echo_scp("127.0.0.1", port, "L3SPOT", "TESTECHO", timeout_s).ok


@contextlib.contextmanager
def verification_scp(ae_title: str = "PACS") -> Iterator[int]:
    """A pynetdicom C-ECHO SCP on an ephemeral 127.0.0.1 port that checks the called AE
    title; yields the port."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        ae.shutdown()


def start_node(config: Path, log_path: Path, port: int, timeout_s: float = 60) -> Popen[bytes]:
    """``l3spot serve --config config`` in its own session; returns once it answers C-ECHO."""
    proc = spawn([*CLI, "serve", "--config", str(config)], log_path)
    deadline = time.monotonic() + timeout_s
    while not echo_ok(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise RuntimeError(f"node did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def start_worker(config: Path, log_path: Path, name: str, queues: str = "analysis,export"):  # noqa: ANN201
    """``l3spot worker`` in its own session (prefork, concurrency 1); returns the Popen."""
    return spawn(
        [*CLI, "worker", "--config", str(config), "--queues", queues, "--hostname", f"{name}@%h"],
        log_path,
    )


def start_redis(port: int, log_path: Path) -> Popen[bytes]:
    """A private redis-server on ``port`` without persistence (a restart loses everything)."""
    proc = spawn(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(log_path.parent),
        ],
        log_path,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    wait_for(lambda: _redis_ping(client), 20, f"redis-server on {port}")
    return proc


def _redis_ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@dataclass
class OrthancPacs:
    """A running Orthanc (the PACS) with its REST and DICOM ports.

    ``dicomweb``: the DICOMweb plugin is loaded, its base URL is :attr:`dicomweb_url`.
    ``user``: HTTP basic authentication is on; these are its (user, password).
    """

    http: int
    dicom: int
    proc: Popen[bytes]
    dicomweb: bool = False
    user: tuple[str, str] | None = None

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service's base URL (STOW-RS posts to ``<it>/studies``)."""
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def _request(self, path: str, data: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}", data=data, method="POST" if data else "GET"
        )
        if self.user is not None:
            token = base64.b64encode(":".join(self.user).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def get(self, path: str) -> Any:
        return self._request(path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request(path, json.dumps(body).encode())

    def sop_uids_of_study(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs of every instance Orthanc holds in the study (with repeats)."""
        found = self.post(
            "/tools/find",
            {
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_uid},
                "RequestedTags": ["SOPInstanceUID"],
                "Expand": True,
            },
        )
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series Orthanc holds in the study (expanded records)."""
        return self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )

    def file(self, instance: str) -> bytes:
        """The DICOM file of an instance (Orthanc id)."""
        url = f"http://127.0.0.1:{self.http}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=10) as r:
            return bytes(r.read())

    def tags(self, series: dict[str, Any]) -> dict[str, Any]:
        """Simplified tags of the first instance of a series record."""
        return self.get(f"/instances/{series['Instances'][0]}/simplified-tags")


def start_orthanc(
    root: Path,
    dicom_port: int | None = None,
    dicomweb: bool = False,
    user: tuple[str, str] | None = None,
    http_port: int | None = None,
) -> OrthancPacs:
    """Start Orthanc with its storage under ``root`` (optionally on a given DICOM port).

    Parameters
    ----------
    root : its storage and configuration folder (an existing one is reused: a restart).
    dicom_port, http_port : its ports (default: free ones).
    dicomweb : load the DICOMweb plugin (:data:`ORTHANC_DICOMWEB_PLUGIN`, at
        ``/dicom-web``).
    user : (user, password) of HTTP basic authentication, which is then required of every
        REST and DICOMweb request; None = no authentication.
    """
    root.mkdir(parents=True, exist_ok=True)
    http, dicom = http_port or free_port(), dicom_port or free_port()
    cfg = {
        "Name": "l3spot-test-pacs",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": user is not None,
        "RegisteredUsers": dict([user]) if user is not None else {},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "OverwriteInstances": True,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if dicomweb else [],
        "StorageCompression": False,
    }
    if dicomweb:
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
    (root / "orthanc.json").write_text(json.dumps(cfg))
    proc = spawn([ORTHANC, str(root / "orthanc.json")], root / "orthanc.log")
    pacs = OrthancPacs(http, dicom, proc, dicomweb, user)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
        try:
            pacs.get("/system")
            return True
        except OSError:
            return False

    wait_for(up, 30, "Orthanc REST API", step=0.2)
    return pacs


def result_sop_uids(results_dir: Path) -> list[str]:
    """SOP Instance UIDs of the result objects (SEG, SR, SC) in one series' results folder."""
    import pydicom

    return sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in sorted(results_dir.glob("*.dcm"))
    )


@dataclass
class StoreLog:
    """What one SCU association got back: per instance (SOP UID, status or None, seconds)."""

    sent: list[tuple[str, int | None, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def acknowledged(self) -> list[str]:
        return [uid for uid, status, _ in self.sent if status == 0]


def send_datasets(
    datasets: list[Dataset], port: int, log: StoreLog | None = None, ae_title: str = "SCANNER"
) -> StoreLog:
    """C-STORE ``datasets`` over one pynetdicom association, recording every status.

    Never raises: an association that breaks (the node was killed) ends the log with
    ``error`` set; the instances after it are not sent.
    """
    from pynetdicom import AE

    log = log if log is not None else StoreLog()
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(cls, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT")
    if not assoc.is_established:
        log.error = "association not established"
        return log
    guard_scu_reactor(assoc)  # else pynetdicom's reactor may eat a response: 30 s stall
    try:
        for ds in datasets:
            t0 = time.perf_counter()
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # the peer died mid-association
                log.error = f"{type(exc).__name__}: {exc}"
                break
            code = int(status.Status) if "Status" in status else None
            log.sent.append((str(ds.SOPInstanceUID), code, time.perf_counter() - t0))
            if code is None or not assoc.is_established:
                log.error = "association broken"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return log


# ---------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """Outcome and figures of :func:`run_load`.

    Attributes
    ----------
    instances : instances sent; acknowledged : those answered 0x0000.
    send_s : wall seconds from the first association to the last release.
    latencies_s : per C-STORE round trip (s), all associations together.
    all_done_s : seconds from the first association to the last series final.
    node_peak_rss_mb : high-water mark of the node process's resident memory (MiB).
    records : final job record of every series.
    stored : instances in the spool per series; expected : sent per series.
    pacs_ok : per series, whether the PACS holds exactly its result objects.
    errors : association errors.
    """

    instances: int
    acknowledged: int
    send_s: float
    latencies_s: list[float]
    all_done_s: float
    node_peak_rss_mb: float
    records: dict[str, Any]
    stored: dict[str, int]
    expected: dict[str, int]
    pacs_ok: dict[str, bool]
    errors: list[str]

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_s) * 1000.0, q))

    def summary(self) -> str:
        states: dict[str, int] = {}
        for r in self.records.values():
            states[r.state] = states.get(r.state, 0) + 1
        return (
            f"{self.acknowledged}/{self.instances} instances acknowledged in {self.send_s:.1f} s "
            f"= {self.acknowledged / self.send_s:.0f} instances/s; C-STORE latency p50 "
            f"{self.percentile_ms(50):.1f} ms, p95 {self.percentile_ms(95):.1f} ms; node peak RSS "
            f"{self.node_peak_rss_mb:.0f} MiB; all {len(self.records)} series final after "
            f"{self.all_done_s:.1f} s {states}; analysed once: "
            f"{sum(r.attempts == 1 for r in self.records.values())}/{len(self.records)}; "
            f"PACS exact: {sum(self.pacs_ok.values())}/{len(self.pacs_ok)}"
        )


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _send_job(args: tuple[list[Dataset], int]) -> StoreLog:
    datasets, port = args
    return send_datasets(datasets, port)


def run_load(
    work: Path,
    n_associations: int,
    n_series: int,
    n_instances: int,
    size: int = 64,
    n_workers: int = 2,
    timeout_s: float = 600,
    fsync: bool = True,
) -> LoadReport:
    """Concurrent associations -> one node (Redis broker) -> ``n_workers`` workers -> Orthanc.

    Starts a private redis-server, Orthanc, ``l3spot serve`` and ``n_workers`` ``l3spot
    worker`` processes (both queues, one pool process each) under ``work``; sends
    ``n_series`` phantom series of ``n_instances`` ``size`` x ``size`` slices over
    ``n_associations`` concurrent associations (series ``i`` goes over association
    ``i % n_associations``, one after another; each association is a forked process with a
    pynetdicom SCU); waits until every series' job record is final; stops everything.
    """
    import multiprocessing

    from core.jobs import JobNotFoundError, JobState, JobStore

    series = [phantom_datasets(1000 + i, n_instances, size) for i in range(n_series)]
    per_assoc: list[list[Dataset]] = [[] for _ in range(n_associations)]
    for i, ds in enumerate(series):
        per_assoc[i % n_associations].extend(ds)
    redis_port, port = free_port(), free_port()
    procs: list[Popen[bytes]] = []
    redis_proc = start_redis(redis_port, work / "redis.log")
    pacs = start_orthanc(work / "orthanc")
    spool = work / "var" / "spool"
    cfg = write_config(
        work / "config.yaml",
        spool,
        port,
        node={"fsync": fsync, "max_series_instances": max(5000, n_instances)},
        broker={"url": f"redis://127.0.0.1:{redis_port}/0", "reconcile_interval_seconds": 5},
        export={
            "destinations": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom}],
            "backoff_initial_seconds": 1,
        },
    )
    try:
        node = start_node(cfg, work / "node.log", port)
        procs.append(node)
        procs += [start_worker(cfg, work / f"worker{i}.log", f"w{i}") for i in range(n_workers)]
        jobs = JobStore(spool)
        t0 = time.monotonic()
        with multiprocessing.get_context("fork").Pool(n_associations) as pool:
            logs = pool.map(_send_job, [(d, port) for d in per_assoc], chunksize=1)
        send_s = time.monotonic() - t0
        uids = [str(ds[0].SeriesInstanceUID) for ds in series]

        def snapshot() -> dict[str, Any]:
            out = {}
            for uid in uids:
                with contextlib.suppress(JobNotFoundError):
                    out[uid] = jobs.get(uid)
            return out

        def final() -> dict[str, Any] | None:
            out = snapshot()
            done = len(out) == len(uids)
            return (
                out
                if done
                and all(
                    r.state in (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)
                    for r in out.values()
                )
                else None
            )

        errors = [log.error for log in logs if log.error]
        try:
            records = wait_for(final, timeout_s, "every series final", step=0.5)
        except AssertionError:  # report what there is: the caller's checks say what is missing
            records = snapshot()
            errors.append(f"not every series final after {timeout_s} s")
        all_done_s = time.monotonic() - t0
        peak = _peak_rss_mb(node.pid)
        stored = {
            str(ds[0].SeriesInstanceUID): len(
                list(
                    (spool / str(ds[0].StudyInstanceUID) / str(ds[0].SeriesInstanceUID)).glob(
                        "*.dcm"
                    )
                )
            )
            for ds in series
        }
        pacs_ok = {}
        for ds in series:
            uid = str(ds[0].SeriesInstanceUID)
            results = spool.parent / "results" / uid
            rec = records.get(uid)
            expected = (
                result_sop_uids(results) if rec is not None and rec.state == JobState.DONE else []
            )
            got = sorted(pacs.sop_uids_of_study(str(ds[0].StudyInstanceUID)))
            pacs_ok[uid] = got == expected
        return LoadReport(
            instances=sum(len(d) for d in per_assoc),
            acknowledged=sum(len(log.acknowledged) for log in logs),
            send_s=send_s,
            latencies_s=[lat for log in logs for _, _, lat in log.sent],
            all_done_s=all_done_s,
            node_peak_rss_mb=peak,
            records=records,
            stored=stored,
            expected={str(ds[0].SeriesInstanceUID): len(ds) for ds in series},
            pacs_ok=pacs_ok,
            errors=errors,
        )
    finally:
        for p in reversed(procs):
            stop(p)
        kill_group(pacs.proc)
        kill_group(redis_proc)
