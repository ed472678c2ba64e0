"""Export: results reach a C-STORE SCP on one association; failures say what really happened."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from core.config import Destination, ExportConfig
from core.layout import result_files
from tests.support.node import free_port, make_ct
from worker.export import FailureKind, backoff_seconds, retry_delay, send_results


class Pacs:
    """A pynetdicom C-STORE SCP answering ``status`` and recording what it got."""

    def __init__(
        self, status: int | Dataset = 0, calling_ae_titles: list[str] | None = None
    ) -> None:
        self.status = status
        self.received: list[Dataset] = []
        self.associations: set[int] = set()
        self.port = free_port()
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = calling_ae_titles or []
        self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int | Dataset:
        self.associations.add(id(event.assoc))
        self.received.append(event.dataset)
        return self.status

    @property
    def destination(self) -> Destination:
        return Destination(ae_title="PACS", host="127.0.0.1", port=self.port)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    study, series = generate_uid(), generate_uid()
    for i, name in enumerate(("seg.dcm", "sr.dcm", "sc.dcm")):
        make_ct(study, series, i).save_as(tmp_path / name, enforce_file_format=True)
    return tmp_path


@pytest.fixture()
def pacs() -> Iterator[Pacs]:
    p = Pacs()
    yield p
    p.ae.shutdown()


def test_three_objects_go_over_one_association(pacs: Pacs, results: Path) -> None:
    files = result_files(results)
    assert [f.name for f in files] == ["seg.dcm", "sr.dcm", "sc.dcm"]
    outcome = send_results(files, pacs.destination, "L3SPOT", timeout_s=10)
    assert outcome.ok and outcome.status is None
    assert len(pacs.received) == 3 and len(pacs.associations) == 1
    assert outcome.stored == [str(d.SOPInstanceUID) for d in pacs.received]


def test_missing_seg_is_not_sent(pacs: Pacs, results: Path) -> None:
    (results / "seg.dcm").unlink()
    assert [f.name for f in result_files(results)] == ["sr.dcm", "sc.dcm"]


def test_remote_failure_status_is_reported_with_its_meaning_and_comment(results: Path) -> None:
    answer = Dataset()
    answer.Status = 0xA700
    answer.ErrorComment = "archive volume full"
    full = Pacs(status=answer)
    try:
        outcome = send_results(result_files(results), full.destination, "L3SPOT", timeout_s=10)
    finally:
        full.ae.shutdown()
    assert not outcome.ok
    assert outcome.status == "0xA700" and outcome.kind == FailureKind.STORE_STATUS
    assert outcome.error == (
        f"PACS@127.0.0.1:{full.port}: C-STORE status 0xA700 (Refused: Out of Resources): "
        "archive volume full"
    )
    assert len(full.received) == 1  # stops at the first refusal
    assert not outcome.reached  # out of resources: the PACS cannot store anything now


def test_a_closed_port_is_reported_as_connection_refused(results: Path) -> None:
    """Reproduction (issue 16): a refused TCP connection was reported as "association aborted"."""
    port = free_port()  # nothing listens there: the kernel answers RST (ECONNREFUSED)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    outcome = send_results(result_files(results), dest, "L3SPOT", timeout_s=3)
    assert not outcome.ok and outcome.status is None and not outcome.reached
    assert outcome.kind == FailureKind.CONNECTION_REFUSED
    assert f"connection refused by 127.0.0.1:{port}" in (outcome.error or "")
    assert "aborted" not in (outcome.error or "")


def test_a_host_name_that_does_not_resolve_is_a_dns_failure(results: Path) -> None:
    dest = Destination(ae_title="PACS", host="pacs.invalid", port=104)  # RFC 6761: never resolves
    outcome = send_results(result_files(results), dest, "L3SPOT", timeout_s=3)
    assert outcome.kind == FailureKind.DNS and not outcome.ok
    assert "host name 'pacs.invalid' does not resolve" in (outcome.error or "")


@pytest.mark.parametrize(
    ("called", "calling_allowed", "reason"),
    [
        ("PACS", ["MODALITY"], "calling ae title not recognised"),
        ("NOTPACS", [], "called ae title not recognised"),
    ],
)
def test_a_rejected_association_gives_the_rejection_reason(
    results: Path, called: str, calling_allowed: list[str], reason: str
) -> None:
    pacs = Pacs(calling_ae_titles=calling_allowed)
    try:
        dest = Destination(ae_title=called, host="127.0.0.1", port=pacs.port)
        outcome = send_results(result_files(results), dest, "L3SPOT", timeout_s=5)
    finally:
        pacs.ae.shutdown()
    assert outcome.kind == FailureKind.REJECTED and not outcome.reached
    # PS3.8 Table 9-21: result 1 (permanent), source 1 (service user), the reason
    assert f"association rejected (rejected permanent) by the service user: {reason}" in (
        outcome.error or ""
    )
    assert pacs.received == []


class RawPeer:
    """A TCP server that answers an association request with ``reply`` (bytes), or nothing.

    ``reply=None`` and ``close=True``: the connection is closed without an answer;
    ``close=False``: the request is read and left unanswered.
    """

    def __init__(self, reply: bytes | None = None, close: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.reply, self.close = reply, close
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.conns.append(conn)
        conn.recv(65536)
        if self.reply is not None:
            conn.sendall(self.reply)
        if self.close:
            conn.close()

    @property
    def destination(self) -> Destination:
        return Destination(ae_title="PACS", host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


# PS3.8 9.3.8: A-ABORT PDU, type 07, length 4, two reserved bytes, source 2 (service
# provider), reason 2 (unexpected PDU)
A_ABORT_PROVIDER_UNEXPECTED_PDU = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 2, 2)


@pytest.mark.parametrize(
    ("peer", "kind", "text"),
    [
        (
            {"reply": A_ABORT_PROVIDER_UNEXPECTED_PDU},
            FailureKind.ABORTED,
            "association aborted: A-ABORT from the peer's service provider: unexpected pdu",
        ),
        (
            {"reply": None},
            FailureKind.ABORTED,
            "A-P-ABORT): the peer closed the connection without answering",
        ),
        (
            {"reply": None, "close": False},
            FailureKind.ASSOCIATION_TIMEOUT,
            "no answer to the association request within 1 s",
        ),
    ],
    ids=["a-abort", "closed", "silent"],
)
def test_an_aborted_or_unanswered_association_says_which(
    results: Path, peer: dict[str, object], kind: FailureKind, text: str
) -> None:
    raw = RawPeer(**peer)  # type: ignore[arg-type]
    try:
        outcome = send_results(result_files(results), raw.destination, "L3SPOT", timeout_s=1)
    finally:
        raw.stop()
    assert outcome.kind == kind and not outcome.ok and not outcome.reached
    assert text in (outcome.error or "")


def test_backoff_doubles_and_is_capped() -> None:
    cfg = ExportConfig(backoff_initial_seconds=2, backoff_max_seconds=10)
    assert [backoff_seconds(a, cfg) for a in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
    assert Destination(ae_title="X", host="h", port=1).label == "X@h:1"


def test_the_default_policy_outlasts_a_maintenance_window() -> None:
    """Reproduction (issue 16): five attempts within 75 s, then failed."""
    cfg = ExportConfig()
    t, attempt, waits = 0.0, 1, []
    while (wait := retry_delay(attempt, t, cfg)) is not None:
        waits.append(wait)
        t += wait
        attempt += 1
    assert waits[:9] == [5, 10, 20, 40, 80, 160, 320, 640, 900]
    assert max(waits) == 900  # below broker.visibility_timeout_seconds (3600)
    assert t == 24 * 3600  # the last attempt falls on the window's end
    assert 90 < attempt < 110
    # an old configuration's max_attempts still ends it earlier
    assert retry_delay(4, 35.0, ExportConfig(max_attempts=5)) == 40
    assert retry_delay(5, 75.0, ExportConfig(max_attempts=5)) is None
