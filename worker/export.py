"""Sending results to a PACS: C-STORE SCU (pynetdicom), all objects on one association,
or DICOMweb STOW-RS, all objects in one request (:mod:`worker.stow`).

One call = one attempt against one destination (:func:`send_results`, either kind). Retries
with exponential backoff are the task's business (:mod:`worker.tasks`), so a PACS that is
down never blocks a worker.
A failed attempt says what really happened (:class:`FailureKind`): the connection was
refused, the host name did not resolve, the connection timed out, the association was
rejected (with the PS3.8 Table 9-21 result, source and reason), aborted (A-ABORT with its
source and reason, or A-P-ABORT), or a C-STORE answered a failure status (with its
meaning, PS3.4 Table B.2-1, and the Error Comment); for STOW-RS, the HTTP status and the
Failure Reason of each instance not stored (PS3.18 10.5.3).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from core.config import AnyDestination, Destination, DicomwebDestination, ExportConfig
from core.netpatch import guard_scu_reactor
from worker.outcome import ExportOutcome, FailureKind
from worker.stow import send_stow

__all__ = ["ExportOutcome", "FailureKind", "backoff_seconds", "retry_delay", "send_results"]

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored" (PS3.4 Table B.2-1: success and the warnings
#: B000 coercion of data elements, B007 data set does not match SOP class, B006 elements
#: discarded).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def backoff_seconds(attempt: int, export: ExportConfig) -> float:
    """Wait before retry number ``attempt`` (1-based): initial x 2^(attempt-1), capped."""
    return float(
        min(export.backoff_initial_seconds * 2 ** max(attempt - 1, 0), export.backoff_max_seconds)
    )


def retry_delay(attempt: int, failing_for_s: float, export: ExportConfig) -> float | None:
    """Seconds to wait before the next attempt to a destination, or None to give up.

    The policy (docs/reliability.md "Export that waits for the PACS"): wait
    :func:`backoff_seconds` (5 s doubling to the 900 s cap by default) while the delivery
    has been failing for less than ``export.retry_for_hours``; the last attempt falls on the
    window's end. ``export.max_attempts``, when set, ends the delivery earlier.

    Parameters
    ----------
    attempt : the number of the attempt that just failed (1-based).
    failing_for_s : seconds since this delivery's first failed attempt (0 for the first).
    export : the export configuration.

    Returns
    -------
    float or None
        The countdown (s) of the next attempt; None when the delivery is given up.
    """
    if export.max_attempts is not None and attempt >= export.max_attempts:
        return None
    left_s = export.retry_for_hours * 3600.0 - failing_for_s
    if left_s <= 0:
        return None
    return min(backoff_seconds(attempt, export), left_s)


def send_results(
    files: list[Path], dest: AnyDestination, calling_ae_title: str, timeout_s: float = 30.0
) -> ExportOutcome:
    """C-STORE ``files`` to ``dest`` over a single association, or STOW-RS them in one request.

    Parameters
    ----------
    files : DICOM Part 10 files (SEG, SR, SC).
    dest : the destination: a C-STORE SCP, or a DICOMweb service
        (:func:`worker.stow.send_stow`).
    calling_ae_title : our AE title (C-STORE only).
    timeout_s : TCP connect, ACSE, DIMSE and network timeout (s); for DICOMweb the connect
        and read timeout, unless the destination sets its own.

    Returns
    -------
    ExportOutcome
        Never raises for network or remote failures; they are reported in the outcome with
        their :class:`FailureKind`. Logging the attempt is the caller's business (it knows
        the source series, :func:`worker.tasks.run_export`).
    """
    if isinstance(dest, DicomwebDestination):
        return send_stow(files, dest, timeout_s)
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout_s
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    seen: set[str] = set()
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        if sop_class in seen:
            continue
        seen.add(sop_class)
        syntaxes = [str(ds.file_meta.TransferSyntaxUID)]
        syntaxes += [
            s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s not in syntaxes
        ]
        ae.add_requested_context(sop_class, syntaxes)
    label = dest.label
    seen_net = _NetworkEvents()
    started = time.monotonic()
    try:
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=seen_net.handlers()
        )
    except (OSError, RuntimeError) as exc:
        kind, why = _connect_failure(dest, timeout_s, exc)
        return ExportOutcome(False, None, f"{label}: {why}", kind=kind)
    if not assoc.is_established:
        kind, why = _association_failure(assoc, seen_net, dest, timeout_s, started)
        return ExportOutcome(False, None, f"{label}: {why}", kind=kind)
    guard_scu_reactor(assoc)
    outcome = ExportOutcome(True)
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # pynetdicom: no accepted presentation context for it
                outcome.ok = False
                outcome.kind = FailureKind.NO_CONTEXT
                outcome.error = (
                    f"{label}: the PACS accepted no presentation context for SOP class "
                    f"{ds.SOPClassUID.name} ({ds.SOPClassUID}) with our transfer syntaxes"
                )
                break
            code = int(status.Status) if "Status" in status else None
            if code is None or code not in STORED_STATUSES:
                outcome.ok = False
                outcome.status = None if code is None else f"0x{code:04X}"
                if code is None:
                    outcome.kind = FailureKind.NO_STORE_RESPONSE
                    outcome.error = f"{label}: {_no_store_response(assoc, seen_net, timeout_s)}"
                else:
                    outcome.kind = FailureKind.STORE_STATUS
                    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
                    comment = str(status.get("ErrorComment", "") or "").strip()
                    outcome.error = f"{label}: C-STORE status {outcome.status} ({meaning})" + (
                        f": {comment}" if comment else ""
                    )
                break
            outcome.stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


class _NetworkEvents:
    """What pynetdicom saw of one association: did TCP connect, which PDUs came back."""

    def __init__(self) -> None:
        self.connected = False
        self.abort: A_ABORT_RQ | None = None
        self.accepted = False

    def handlers(self) -> list[tuple[evt.EventType, object]]:
        return [(evt.EVT_CONN_OPEN, self._open), (evt.EVT_PDU_RECV, self._pdu)]

    def _open(self, event: evt.Event) -> None:
        self.connected = True

    def _pdu(self, event: evt.Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ABORT_RQ):
            self.abort = pdu
        elif isinstance(pdu, A_ASSOCIATE_AC):
            self.accepted = True


def _abort_text(pdu: A_ABORT_RQ) -> str:
    """An A-ABORT PDU's source and reason (PS3.8 Table 9-26)."""
    if pdu.source == 2:
        return f"A-ABORT from the peer's service provider: {pdu.reason_str.lower()}"
    return "A-ABORT from the peer (service user)"


def _association_failure(
    assoc: Association, seen: _NetworkEvents, dest: Destination, timeout_s: float, started: float
) -> tuple[FailureKind, str]:
    """Why ``ae.associate`` returned an association that is not established."""
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None:
            # PS3.8 Table 9-21: result (permanent/transient), source, reason/diagnostic
            return FailureKind.REJECTED, (
                f"association rejected ({rj.result_str.lower()}) by the "
                f"{rj.source_str.lower()}: {rj.reason_str.lower()} "
                f"(called AE title {dest.ae_title!r})"
            )
        return FailureKind.REJECTED, "association rejected"
    if not seen.connected:
        return _connect_failure(dest, timeout_s, None, time.monotonic() - started)
    if seen.abort is not None:
        return FailureKind.ABORTED, f"association aborted: {_abort_text(seen.abort)}"
    if seen.accepted:
        return FailureKind.NO_CONTEXT, (
            "association accepted but none of the proposed presentation contexts "
            "(SOP class and transfer syntax) was"
        )
    if time.monotonic() - started >= 0.9 * timeout_s:
        return FailureKind.ASSOCIATION_TIMEOUT, (
            f"no answer to the association request within {timeout_s:g} s (ACSE timeout)"
        )
    return FailureKind.ABORTED, (
        "association aborted (A-P-ABORT): the peer closed the connection without answering "
        "the association request"
    )


def _no_store_response(assoc: Association, seen: _NetworkEvents, timeout_s: float) -> str:
    if seen.abort is not None:
        return f"association aborted during C-STORE: {_abort_text(seen.abort)}"
    if assoc.is_aborted:
        return "association aborted during C-STORE (A-P-ABORT: the connection was lost)"
    return f"no C-STORE response within {timeout_s:g} s (DIMSE timeout)"


def _connect_failure(
    dest: Destination,
    timeout_s: float,
    exc: BaseException | None,
    elapsed_s: float = 0.0,
) -> tuple[FailureKind, str]:
    """Why no TCP connection to ``dest`` opened.

    pynetdicom only logs the socket error (``AssociationSocket.connect``), so it is found
    again here: the name is resolved, and unless pynetdicom already waited the whole
    connection timeout, one plain TCP connection is tried (and closed at once).
    """
    where = f"{dest.host}:{dest.port}"
    try:
        socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return FailureKind.DNS, f"host name {dest.host!r} does not resolve (DNS: {err.strerror})"
    if exc is None and elapsed_s >= 0.9 * timeout_s:
        exc = TimeoutError()
    if exc is None:
        try:
            socket.create_connection((dest.host, dest.port), timeout=timeout_s).close()
        except OSError as err:
            exc = err
        else:
            return FailureKind.NETWORK, f"could not connect to {where} (it answers again now)"
    if isinstance(exc, ConnectionRefusedError):
        return FailureKind.CONNECTION_REFUSED, (
            f"connection refused by {where} (no DICOM service listens there: the PACS is down "
            "or the port is wrong)"
        )
    if isinstance(exc, TimeoutError):
        return FailureKind.CONNECT_TIMEOUT, (
            f"no answer to the TCP connection to {where} within {timeout_s:g} s (host down, or "
            "a firewall drops the packets)"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return FailureKind.NETWORK, f"{where} is unreachable ({exc.strerror})"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return FailureKind.NETWORK, f"cannot connect to {where}: {type(exc).__name__}: {reason}"
