"""Only trusted peers get in, limits answer with the proper status, and no patient data leaks.

Association rejections are checked field by field against PS3.8 Table 9-21 with pynetdicom
and with dcmtk's ``echoscu``/``storescu`` as the peer; the disk floor uses an injected
free-space function; the last test sends a phantom series through a real ``l3spot serve``
and scans every log line, the audit log and the job database for the patient's name, ID
and birth date.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.config import Config
from service.security import PeerPolicy
from tests.support.node import PATIENT_NAME, free_port, make_ct
from tests.support.scp_node import MIB
from tests.support.scp_node import ScpNode as Node

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _associate(port: int, calling: str = "SCANNER", called: str = "L3SPOT") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    return (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))


def test_unknown_calling_ae_title_is_rejected_permanently_with_reason_3(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(security={"allowed_calling_ae_titles": ["CT1", "CT2"]})
    with caplog.at_level(logging.INFO):
        assert _rejection(_associate(node.port, calling="INTRUDER")) == (1, 1, 3)
    rec = node.records("rejected")[0]
    assert rec["calling_ae_title"] == "INTRUDER" and rec["address"] == "127.0.0.1"
    assert rec["reason"] == "calling AE title not allowed" and rec["rejection"] == [1, 1, 3]
    assert any("association_rejected" in r.getMessage() for r in caplog.records)
    ok = _associate(node.port, calling="CT2")
    assert ok.is_established and int(ok.send_c_echo().Status) == 0
    ok.release()


def test_wrong_called_ae_title_is_rejected_with_reason_7(make_node: Callable[..., Node]) -> None:
    node = make_node()
    assert _rejection(_associate(node.port, called="SOMEONE")) == (1, 1, 7)
    assert node.records("rejected")[0]["called_ae_title"] == "SOMEONE"


def test_called_ae_title_is_not_checked_when_not_required(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(security={"require_called_ae_title": False})
    assoc = _associate(node.port, called="ANYTHING")
    assert assoc.is_established
    assoc.release()


def test_source_address_outside_the_allowed_networks_is_rejected(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(security={"allowed_addresses": ["10.0.0.0/8", "192.168.1.7"]})
    assert _rejection(_associate(node.port)) == (1, 1, 3)
    assert node.records("rejected")[0]["reason"] == "address not allowed"
    open_node = make_node(security={"allowed_addresses": ["127.0.0.0/8"]})
    assoc = _associate(open_node.port)
    assert assoc.is_established
    assoc.release()


def test_address_matching_handles_cidrs_single_hosts_and_ipv4_mapped_ipv6() -> None:
    cfg = Config.model_validate({"security": {"allowed_addresses": ["10.1.0.0/16", "::1"]}})
    policy = PeerPolicy(cfg)
    assert policy.address_allowed("10.1.200.3")
    assert policy.address_allowed("::ffff:10.1.0.9")
    assert policy.address_allowed("::1")
    assert not policy.address_allowed("10.2.0.1")
    assert not policy.address_allowed("not-an-ip")
    with pytest.raises(ValueError):
        PeerPolicy(Config.model_validate({"security": {"allowed_addresses": ["10.0.0.0/33"]}}))


def test_more_than_max_associations_get_transient_local_limit_exceeded(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(node={"max_associations": 2})
    held = [_associate(node.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    assert _rejection(_associate(node.port)) == (2, 3, 2)
    assert "max_associations" in node.records("rejected")[0]["reason"]
    for a in held:
        a.release()
    time.sleep(0.3)
    again = _associate(node.port)
    assert again.is_established
    again.release()


def test_low_disk_refuses_associations_then_stores_with_a700_before_the_floor(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(node={"min_free_disk_mb": 100})
    node.free = 99 * MIB
    assert _rejection(_associate(node.port)) == (2, 3, 1)
    assert node.records("rejected")[0]["reason"] == "free disk below node.min_free_disk_mb"
    node.free = 100 * MIB + 1000  # above the floor, but not by one instance (~1.6 kB)
    assoc = _associate(node.port)
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    assert int(assoc.send_c_store(make_ct(study, series, 0, size=32)).Status) == 0xA700
    node.free = 200 * MIB
    assert int(assoc.send_c_store(make_ct(study, series, 1, size=32)).Status) == 0
    assoc.release()
    assert len(list((node.spool.root / study / series).glob("*.dcm"))) == 1
    assert not list(node.spool.quarantine_dir.iterdir())  # resource refusals stay with sender


def test_series_beyond_max_series_instances_answers_a700(make_node: Callable[..., Node]) -> None:
    node = make_node(node={"max_series_instances": 3})
    study, big, other = generate_uid(), generate_uid(), generate_uid()
    assoc = _associate(node.port)
    statuses = [int(assoc.send_c_store(make_ct(study, big, i)).Status) for i in range(5)]
    assert statuses == [0, 0, 0, 0xA700, 0xA700]
    assert int(assoc.send_c_store(make_ct(study, other, 0)).Status) == 0
    assoc.release()
    assert len(list((node.spool.root / study / big).glob("*.dcm"))) == 3
    rec = node.records("released")[0]
    assert (rec["stored"], rec["failed"]) == (4, 2)


def test_a_completed_series_leaves_no_count_behind_and_a_late_instance_recounts(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(node={"max_series_instances": 3})
    handler = node.server.store_handler
    study, series = generate_uid(), generate_uid()
    assoc = _associate(node.port)
    assert [int(assoc.send_c_store(make_ct(study, series, i)).Status) for i in range(2)] == [0, 0]
    assert handler._series_counts == {series: 2}
    handler.forget_series(series)  # what the watcher does when the series is stable
    assert handler._series_counts == {}
    # a late instance of the same series: the count comes back from the spool folder, so
    # the limit still holds (2 on disk + 1 = 3 allowed, the 4th refused)
    statuses = [int(assoc.send_c_store(make_ct(study, series, i)).Status) for i in (2, 3)]
    assoc.release()
    assert statuses == [0, 0xA700]
    assert handler._series_counts == {series: 3}


def test_max_pdu_is_advertised_and_oversized_pdus_abort_the_connection(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(node={"max_pdu_bytes": 32768})
    assoc = _associate(node.port)
    assert assoc.acceptor.maximum_length == 32768
    assoc.release()
    # A P-DATA-TF header announcing 3 GB: the node must drop the connection, not buffer it.
    # Before an association it answers A-ABORT (source 2, reason 2: unexpected PDU; PS3.8
    # Table 9-26) and closes; the connection ends either way
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x04, 0, 3_000_000_000) + b"\x00" * 1000)
        answer = b""
        try:
            while chunk := s.recv(100):
                answer += chunk
        except ConnectionResetError:
            pass
        assert answer in (b"", bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 2]))
    ok = _associate(node.port)
    assert ok.is_established and int(ok.send_c_echo().Status) == 0
    ok.release()


def test_accepted_association_is_audited_with_counts_and_duration(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()
    assoc = _associate(node.port, calling="CT7")
    study, series = generate_uid(), generate_uid()
    good = make_ct(study, series, 0)
    bad = make_ct(study, series, 1)
    bad.SOPInstanceUID = "1.2.bad"
    bad.file_meta.MediaStorageSOPInstanceUID = "1.2.bad"
    assert [int(assoc.send_c_store(d).Status) for d in (good, bad)] == [0, 0xC000]
    assoc.release()
    rec = node.records("released")[0]
    assert rec["calling_ae_title"] == "CT7" and rec["called_ae_title"] == "L3SPOT"
    assert rec["address"] == "127.0.0.1" and isinstance(rec["port"], int)
    assert (rec["stored"], rec["failed"]) == (1, 1)
    assert 0 <= rec["duration_s"] < 30 and rec["tls"] is False
    text = node.audit.path.read_text()
    assert PATIENT_NAME not in text and "SECRET-ID-42" not in text


@pytest.mark.integration
def test_dcmtk_echoscu_and_storescu_are_rejected_or_accepted_by_calling_ae(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    for prog in (ECHOSCU, STORESCU):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (see .ci/run)")
    node = make_node(security={"allowed_calling_ae_titles": ["CT1"]})
    base = ["-aec", "L3SPOT", "127.0.0.1", str(node.port)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=30, env=NODELAY)

    bad = run(ECHOSCU, "-aet", "INTRUDER", *base)
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    assert run(ECHOSCU, "-aet", "CT1", *base).returncode == 0
    wrong_called = run(ECHOSCU, "-aet", "CT1", "-aec", "NOTUS", "127.0.0.1", str(node.port))
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    ds = make_ct(generate_uid(), generate_uid())
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    assert run(STORESCU, "-aet", "INTRUDER", *base, str(tmp_path / "one.dcm")).returncode != 0
    assert not list(node.spool.root.rglob("*.dcm"))
    assert run(STORESCU, "-aet", "CT1", *base, str(tmp_path / "one.dcm")).returncode == 0
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1


# ------------------------------------------------------------- patient data never leaks


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.integration
def test_logs_audit_and_job_records_of_a_real_send_never_contain_patient_identifiers(
    tmp_path: Path, phantom_series: tuple[Path, Any]
) -> None:
    if not os.access(STORESCU, os.X_OK):
        pytest.skip(f"{STORESCU} not installed (see .ci/run)")
    series_dir, phantom = phantom_series
    name = phantom.volume.patient.name
    patient_id = phantom.volume.patient.patient_id
    birth = "19450317"
    assert name.startswith("PHANTOM^") and patient_id
    src = tmp_path / "src"
    src.mkdir()
    files = sorted(series_dir.glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = birth
        ds.save_as(src / f.name)
    port = free_port()
    var = tmp_path / "var"
    cfg = {
        "node": {
            "host": "127.0.0.1",
            "port": port,
            "spool_dir": str(var / "spool"),
            "series_stable_seconds": 1,
            "watcher_interval_seconds": 0.2,
            "min_slices": 5,
        },
        "broker": {"url": None, "serve_starts_workers": False},
        "logging": {"level": "DEBUG"},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "l3spot", "serve", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=NODELAY,
        )
        try:
            assert _wait_for(lambda: _port_open(port), 60), log_path.read_text()
            out = subprocess.run(
                [STORESCU, "-aet", "CT1", "-aec", "L3SPOT", "127.0.0.1", str(port), "+sd"]
                + [str(src)],
                capture_output=True,
                text=True,
                timeout=60,
                env=NODELAY,
            )
            assert out.returncode == 0, out.stderr
            db = var / "spool" / "jobs.sqlite"
            assert _wait_for(lambda: db.is_file() and "queued" in _dump_db(db), 30)
        finally:
            proc.terminate()
            proc.wait(30)
    stored = list((var / "spool").rglob("*.dcm"))
    assert len(stored) == len(files)
    assert pydicom.dcmread(stored[0]).PatientName == name  # the data itself is intact
    logs = log_path.read_text()
    audit = (var / "audit.log").read_text()
    jobs = _dump_db(var / "spool" / "jobs.sqlite")
    released = [json.loads(line) for line in audit.splitlines() if '"released"' in line]
    assert "association_released" in logs and released[0]["stored"] == len(files)
    for secret in (name, name.replace("^", " "), patient_id, birth):
        for where, text in (("log", logs), ("audit", audit), ("jobs", jobs)):
            assert secret not in text, f"{secret!r} found in the {where}"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _dump_db(path: Path) -> str:
    with sqlite3.connect(path) as con:
        return "\n".join(con.iterdump())
