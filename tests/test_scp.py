"""The SCP stores what scanners send, answers the right DIMSE status, and quarantines garbage."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service import scp
from service.spool import Spool, SpoolWriteError
from tests.node_helpers import PATIENT_NAME, free_port, make_ct
from worker.config import Config

STORESCU = "/usr/bin/storescu"


class Node:
    """An in-process SCP on a free port, recording ``on_stored`` calls."""

    def __init__(self, tmp: Path) -> None:
        self.config = Config.model_validate(
            {"node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": tmp / "spool"}}
        )
        self.spool = Spool(tmp / "spool", tmp / "quarantine")
        self.stored: list[tuple[str, str, Path]] = []
        self.ae, self.server = scp.start_scp(
            self.config, self.spool, lambda *a: self.stored.append(a)
        )
        self.port = self.config.node.port


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.ae.shutdown()


def _send(port: int, datasets: list[Dataset], syntax: str = ExplicitVRLittleEndian) -> list[int]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_c_echo_answers_success(node: Node) -> None:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="L3SPOT")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_c_store_writes_a_valid_part10_file_and_reports_the_series(node: Node) -> None:
    study, series = generate_uid(), generate_uid()
    sent = [make_ct(study, series, i) for i in range(3)]
    assert _send(node.port, sent) == [0, 0, 0]
    for ds in sent:
        path = node.spool.root / study / series / f"{ds.SOPInstanceUID}.dcm"
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(back.pixel_array, ds.pixel_array)
    assert {(s[0], s[1]) for s in node.stored} == {(study, series)}
    assert len(node.stored) == 3


def test_implicit_vr_and_rle_compressed_instances_are_stored(node: Node) -> None:
    study, series = generate_uid(), generate_uid()
    implicit = make_ct(study, series, 0)
    assert _send(node.port, [implicit], ImplicitVRLittleEndian) == [0]
    rle = make_ct(study, series, 1)
    rle.compress(RLELossless)
    assert _send(node.port, [rle], RLELossless) == [0]
    back = pydicom.dcmread(node.spool.root / study / series / f"{rle.SOPInstanceUID}.dcm")
    assert back.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(back.pixel_array, make_ct(study, series, 1).pixel_array)


def test_missing_series_uid_answers_c000_and_quarantines_with_reason(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_ct(generate_uid(), generate_uid())
    del ds.SeriesInstanceUID
    with caplog.at_level(logging.INFO):
        assert _send(node.port, [ds]) == [0xC000]
    reasons = list(node.spool.quarantine_dir.glob("*.reason.json"))
    assert len(reasons) == 1
    info = json.loads(reasons[0].read_text())
    assert "SeriesInstanceUID" in info["reason"]
    assert info["sop_instance_uid"] == ds.SOPInstanceUID
    assert info["calling_ae_title"] == "SCANNER"
    assert not list(node.spool.root.rglob("*.dcm"))
    assert PATIENT_NAME not in caplog.text and "SECRET-ID-42" not in caplog.text
    assert any("store_rejected" in r.getMessage() for r in caplog.records)


def test_path_traversal_uid_is_rejected(node: Node) -> None:
    ds = make_ct("1.2.3", "../../../tmp")
    assert _send(node.port, [ds]) == [0xC000]
    assert not list(node.spool.root.rglob("*.dcm"))


def test_sop_class_mismatch_answers_a900(tmp_path: Path) -> None:
    # No SCU sends this on purpose, so the handler gets a hand-made event.
    ds = make_ct(generate_uid(), generate_uid())
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture inside, CT outside
    event = SimpleNamespace(
        request=SimpleNamespace(
            DataSet=io.BytesIO(_encode(ds)),
            AffectedSOPClassUID=CTImageStorage,
            AffectedSOPInstanceUID=ds.SOPInstanceUID,
        ),
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="SCANNER", address="127.0.0.1")),
    )
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    handler = scp.StoreHandler(spool, lambda *a: None)
    status = handler.handle_store(event)  # type: ignore[arg-type]
    assert int(status.Status) == 0xA900
    assert len(list(spool.quarantine_dir.glob("*.reason.json"))) == 1


def test_disk_failure_answers_a700(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> Path:
        raise SpoolWriteError(28, "No space left on device")

    monkeypatch.setattr(node.spool, "write_instance", full)
    assert _send(node.port, [make_ct(generate_uid(), generate_uid())]) == [0xA700]
    assert node.stored == []


def test_read_uids_stops_before_pixel_data() -> None:
    ds = make_ct("1.2.3", "1.2.3.4", size=64)
    raw = _encode(ds)
    uids = scp.read_uids(raw, ExplicitVRLittleEndian)
    assert uids == {
        "sop_class": CTImageStorage,
        "sop_instance": ds.SOPInstanceUID,
        "study": "1.2.3",
        "series": "1.2.3.4",
    }
    with pytest.raises(scp.UnreadableDatasetError):
        scp.read_uids(b"\x08\x00\x16\x00ZZ\x04\x001234", ExplicitVRLittleEndian)
    # garbage is not a data set: the handler answers C000 and quarantines it
    with pytest.raises(scp.UnreadableDatasetError, match="unknown VR"):
        scp.read_uids(b"\xff" * 20, ExplicitVRLittleEndian)


@pytest.mark.integration
def test_dcmtk_storescu_sends_a_series(node: Node, tmp_path: Path) -> None:
    if not os.access(STORESCU, os.X_OK):
        pytest.skip("dcmtk storescu not installed (see .ci/run)")
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        ds = make_ct(study, series, i)
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    out = subprocess.run(
        [
            STORESCU,
            "-aec",
            "L3SPOT",
            "-aet",
            "SCANNER",
            "127.0.0.1",
            str(node.port),
            "+sd",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert len(list((node.spool.root / study / series).glob("*.dcm"))) == 5


def test_c_store_is_answered_at_once_while_the_job_database_is_locked(tmp_path: Path) -> None:
    """Issue 7, the 30 s stall: a busy job database must not delay C-STORE responses.

    The node's ``on_stored`` is the series watcher's ``touch``. It used to write the
    ``received`` job record from the association thread on the first instance of each
    series, waiting up to 30 s for SQLite's write lock, as long as the scanner's DIMSE
    timeout. Here another connection holds the lock (a worker, the reconciliation, the
    CLI) while three new series arrive: every response must come within a second; the
    records are written by the watcher once the lock is free.
    """
    import sqlite3
    import time

    from service.watcher import SeriesWatcher
    from worker.jobstore import RECEIVED, JobStore

    config = Config.model_validate(
        {"node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": tmp_path / "spool"}}
    )
    jobs = JobStore(tmp_path / "spool")
    watcher = SeriesWatcher(config.node, jobs, lambda d, s, t: None)
    ae, _ = scp.start_scp(config, Spool(tmp_path / "spool", tmp_path / "q"), watcher.touch)
    lock = sqlite3.connect(jobs.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        scu = AE(ae_title="SCANNER")
        scu.dimse_timeout = 5  # fail fast: before the fix each new series waited 30 s
        scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = scu.associate("127.0.0.1", config.node.port, ae_title="L3SPOT")
        assert assoc.is_established
        series = [generate_uid() for _ in range(3)]
        waits = []
        for uid in series:
            for i in range(2):
                t0 = time.perf_counter()
                status = assoc.send_c_store(make_ct("1.2.3", uid, i))
                waits.append(time.perf_counter() - t0)
                assert "Status" in status and int(status.Status) == 0
        assoc.release()
        assert max(waits) < 1.0, waits
        lock.execute("COMMIT")
        assert watcher.record_received() == 3
        assert {jobs.get(uid).state for uid in series} == {RECEIVED}
    finally:
        lock.close()
        ae.shutdown()
