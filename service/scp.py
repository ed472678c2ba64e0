"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class (pynetdicom 3).

Association requests pass :class:`service.security.PeerPolicy` first (allowed calling AE
titles and addresses, called AE title, association limit, free-disk floor); a refused
peer gets the A-ASSOCIATE-RJ listed there, a log line and an audit record.

The C-STORE handler stays small because it runs on the association's thread: it checks the
structure of the received bytes and reads the UIDs without decoding the data set
(:mod:`service.validate`), writes preamble + File Meta Information + the data set bytes as
received, makes them durable (:mod:`service.spool`) and answers:

============  ==========================================================================
``0x0000``    stored (the file is durable on disk), or an identical copy was already
``0x0111``    Duplicate SOP Instance (PS3.7 C.4.2): the SOP Instance UID is already
              stored with *different* bytes. The first copy is kept; the second goes to
              quarantine with a reason file (nothing is lost, nothing silently replaced)
``0xA700``    Refused: Out of Resources: the disk refused the write, the free-disk floor
              ``node.min_free_disk_mb`` would be crossed, or the series already holds
              ``node.max_series_instances`` instances (not quarantined: the sender keeps it)
``0x0122``    Refused: SOP Class not supported (PS3.7 C.4.2): the C-STORE came on a
              presentation context whose abstract syntax is another SOP class (e.g. a CT
              image on the Verification context, PS3.8 section 9.3.5); quarantined
``0xA900``    Error: Data Set does not match SOP Class (PS3.4 Table B.2-1): the data set's
              SOP Class UID is not the Affected SOP Class UID; quarantined
``0xC000``    Error: Cannot understand: malformed data set (truncated, bad lengths or
              VRs, unordered tags), missing or invalid UIDs, a CT image without its pixel
              attributes or with too little pixel data; quarantined with the reason
============  ==========================================================================
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core import netpatch
from core.config import Config
from core.derived import is_own_output
from core.errors import L3SpotError, NetPatchError
from core.logs import log_event
from service.audit import AuditLog, audit_log_path
from service.gate import ConnectionGate, GatedAssociationServer, gate_recorder
from service.receive import ReceivedDataset, clear_incoming, spilling_factory
from service.security import FreeBytes, PeerPolicy, disk_free_bytes, make_ssl_context
from service.spool import Spool, SpoolWriteError, is_valid_uid
from service.validate import InflateLimitError, MalformedDatasetError, inspect_dataset

__all__ = [
    "STATUS_SUCCESS",
    "STATUS_DUPLICATE_SOP_INSTANCE",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_MISMATCH",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_CANNOT_UNDERSTAND",
    "StoreHandler",
    "UnreadableDatasetError",
    "build_ae",
    "make_ssl_context",
    "read_uids",
    "start_scp",
]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000

#: ``on_stored(study_uid, series_uid, series_dir)`` after each durable write. It runs on the
#: association's thread before the response is sent, so it must return at once: no
#: database, broker or network calls (a 30 s SQLite busy wait there equals the scanner's
#: DIMSE timeout; docs/reliability.md "The 30 s C-STORE stall").
OnStored = Callable[[str, str, Path], None]

#: Idle sleep of pynetdicom's DUL reactor per loop (its default is 1 ms). Costs a little CPU
#: per open association; worth it for ingest latency.
DUL_IDLE_SLEEP_S = 0.0001
#: Largest A-ASSOCIATE-RQ accepted whatever ``node.max_pdu_bytes`` says (a request with
#: every storage SOP class x a dozen transfer syntaxes is about 100 kB).
MAX_ASSOCIATE_RQ_BYTES = 1024 * 1024
#: Largest PDU when ``node.max_pdu_bytes`` is 0 ("unlimited" in pynetdicom).
UNLIMITED_PDU_GUARD_BYTES = 64 * 1024 * 1024
_PREAMBLE = b"\x00" * 128 + b"DICM"


class UnreadableDatasetError(L3SpotError, ValueError):
    """The received data set cannot be parsed far enough to find its UIDs."""


def read_uids(raw: bytes, transfer_syntax: UID) -> dict[str, str]:
    """SOP Class/Instance, Study and Series Instance UIDs of an encoded data set.

    Walks the element headers only (:func:`service.validate.inspect_dataset`), so the
    pixel data is never decoded or copied.

    Parameters
    ----------
    raw : the data set as received (no File Meta Information).
    transfer_syntax : the presentation context's transfer syntax.

    Returns
    -------
    dict with keys ``sop_class``, ``sop_instance``, ``study``, ``series`` ("" when absent).

    Raises
    ------
    UnreadableDatasetError
        The bytes are not a well-formed data set in that transfer syntax.
    """
    try:
        return inspect_dataset(raw, transfer_syntax).uids()
    except MalformedDatasetError as exc:
        raise UnreadableDatasetError(f"cannot parse data set: {exc}") from exc


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # LO: no backslash (it would split the value), printable ASCII, at most 64 characters
    text = "".join(c if " " <= c < "\x7f" and c != "\\" else "?" for c in comment)
    ds.ErrorComment = text[:64].strip()
    return ds


def _element(group_elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, group_elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, group_elem, vr, len(value)) + value


def file_meta_bytes(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Encoded File Meta Information (PS3.10 section 7.1), group length included.

    Hand-encoded (Explicit VR Little Endian, as PS3.10 requires) because pydicom's
    ``write_file_meta_info`` cost more than the rest of the handler together. Holds the
    same elements as pynetdicom's ``Event.file_meta`` plus (0002,0016) Source AE Title.

    Parameters
    ----------
    sop_class, sop_instance : Media Storage SOP Class/Instance UID (the Affected ones).
    transfer_syntax : the presentation context's transfer syntax UID.
    source_ae : the calling AE title.

    Returns
    -------
    bytes from (0002,0000) to the last group 2 element, ready to follow ``DICM``.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _element(0x0002, b"UI", sop_class.encode(), b"\x00"),
            _element(0x0003, b"UI", sop_instance.encode(), b"\x00"),
            _element(0x0010, b"UI", transfer_syntax.encode(), b"\x00"),
            _element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode(), b"\x00"),
            _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "),
            _element(0x0016, b"AE", source_ae.strip().encode("ascii", "replace"), b" "),
        )
    )
    return struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


class StoreHandler:
    """``EVT_C_STORE`` / ``EVT_C_ECHO`` / association event handlers bound to one spool.

    Parameters
    ----------
    spool : where instances are written.
    on_stored : called after each durable write (the series watcher's ``touch``).
    config : limits (``node``) and access control (``security``); defaults apply if None.
    audit : the audit log (None = no audit records).
    free_bytes : free-space function of the spool's file system (tests inject one).
    """

    def __init__(
        self,
        spool: Spool,
        on_stored: OnStored,
        config: Config | None = None,
        audit: AuditLog | None = None,
        free_bytes: FreeBytes = disk_free_bytes,
    ) -> None:
        self.spool = spool
        spool.build_sop_index()  # SOP Instance UIDs across series (issue 14, defect 3)
        self.on_stored = on_stored
        self.config = config or Config()
        self.audit = audit
        self.policy = PeerPolicy(self.config, free_bytes)
        self.policy.spool_dir = spool.root
        self.max_series_instances = self.config.node.max_series_instances
        max_pdu = self.config.node.max_pdu_bytes
        self.pdu_limit = (
            max(max_pdu, MAX_ASSOCIATE_RQ_BYTES) if max_pdu else UNLIMITED_PDU_GUARD_BYTES
        )
        node = self.config.node
        freed = clear_incoming(spool.root)
        if freed:
            log_event(log, "incoming_leftovers_deleted", bytes=freed)
        self.max_inflated_bytes = node.max_inflated_mb * 1024 * 1024
        self.make_buffer = spilling_factory(spool.root, node.spill_to_disk_mb, node.max_instance_mb)
        self._series_counts: dict[str, int] = {}
        self._inflight: set[str] = set()
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The ``evt_handlers`` list for ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
        ]

    @staticmethod
    def handle_echo(event: evt.Event) -> int:
        """C-ECHO: always success (the node is up)."""
        return STATUS_SUCCESS

    def handle_conn_open(self, event: evt.Event) -> None:
        """Tune the accepted connection for many back-to-back C-STOREs; guard the PDU size.

        Attaches :func:`core.netpatch.attach_acceptor_patches`: no Nagle (DESIGN.md "Known
        pitfalls"), the PDU-length guard, the state-machine guard (a malformed message
        aborts the association with an "aborted" audit record) and the reactor wake-up
        (:class:`core.netpatch.ReactorClock`); and
        :func:`core.netpatch.bound_received_datasets` (:mod:`service.receive`: large data
        sets go to disk as they arrive, beyond ``node.max_instance_mb`` they are dropped).
        A patch that cannot attach is logged as an error (``netpatch_failed``) and raised
        (pynetdicom logs the handler's exception too);
        :func:`core.netpatch.verify_pynetdicom` at start-up makes that unlikely.
        """
        assoc = event.assoc
        assoc.l3spot_t0 = time.monotonic()  # type: ignore[attr-defined]
        context = {"address": assoc.requestor.address}
        try:
            netpatch.attach_acceptor_patches(
                assoc,
                self.pdu_limit,
                context,
                on_abort=lambda reason: self._record_end(assoc, "aborted", reason=reason),
                logger=log,
            )
            netpatch.bound_received_datasets(assoc, self.make_buffer)
        except NetPatchError as exc:
            log_event(log, "netpatch_failed", level=logging.ERROR, error=str(exc), **context)
            raise

    def _peer(self, assoc: Any) -> dict[str, Any]:
        rq = getattr(assoc.requestor, "primitive", None)
        calling = getattr(rq, "calling_ae_title", None) or assoc.requestor.ae_title or ""
        called = getattr(rq, "called_ae_title", None) or ""
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        return {
            "calling_ae_title": str(calling).strip(),
            "called_ae_title": str(called).strip(),
            "address": assoc.requestor.address,
            "port": assoc.requestor.port,
            "tls": sock is not None and hasattr(sock, "cipher"),
        }

    def _duration(self, assoc: Any) -> float:
        return round(time.monotonic() - getattr(assoc, "l3spot_t0", time.monotonic()), 3)

    def handle_requested(self, event: evt.Event) -> None:
        """Access control and limits on an A-ASSOCIATE-RQ (:class:`PeerPolicy`)."""
        assoc = event.assoc
        peer = self._peer(assoc)
        with self._lock:  # count and admit together: two requests cannot both take the last
            active = 1 + sum(  # this request included, as PeerPolicy.check expects
                1
                for a in assoc.ae.active_associations
                if a.is_acceptor and getattr(a, "l3spot_admitted", False) and a is not assoc
            )
            rejection = self.policy.check(
                peer["calling_ae_title"], peer["called_ae_title"], peer["address"], active
            )
            if rejection is None:
                assoc.l3spot_admitted = True  # type: ignore[attr-defined]
                return
        assoc.l3spot_rejected = True  # type: ignore[attr-defined]
        log_event(
            log,
            "association_rejected",
            level=logging.WARNING,
            reason=rejection.reason,
            result=rejection.result,
            source=rejection.source,
            diagnostic=rejection.diagnostic,
            **peer,
        )
        if self.audit is not None:
            self.audit.record(
                event="association",
                outcome="rejected",
                reason=rejection.reason,
                rejection=[rejection.result, rejection.source, rejection.diagnostic],
                stored=0,
                failed=0,
                duration_s=self._duration(assoc),
                **peer,
            )
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.kill()

    def handle_rejected(self, event: evt.Event) -> None:
        """Audit a rejection made by pynetdicom itself (after our policy accepted)."""
        assoc = event.assoc
        if getattr(assoc, "l3spot_rejected", False):
            return
        peer = self._peer(assoc)
        log_event(log, "association_rejected", level=logging.WARNING, reason="pynetdicom", **peer)
        if self.audit is not None:
            self.audit.record(
                event="association",
                outcome="rejected",
                reason="rejected by pynetdicom",
                stored=0,
                failed=0,
                duration_s=self._duration(assoc),
                **peer,
            )

    def handle_accepted(self, event: evt.Event) -> None:
        """Log an accepted association; start its counters; poll faster from now on.

        The DUL's short idle sleep (:data:`DUL_IDLE_SLEEP_S`) is set only once the
        association is accepted: a port probe or a stalled peer keeps pynetdicom's 1 ms
        and so costs a tenth of the CPU while it lingers.
        """
        assoc = event.assoc
        netpatch.set_dul_idle_sleep(assoc, DUL_IDLE_SLEEP_S)
        assoc.l3spot_counts = {"stored": 0, "failed": 0}  # type: ignore[attr-defined]
        log_event(log, "association_accepted", **self._peer(assoc))

    def handle_closed(self, event: evt.Event) -> None:
        """Log and audit an association that ended (released or aborted) with its counts."""
        assoc = event.assoc
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        extra: dict[str, str] = {}
        if getattr(assoc.requestor, "primitive", None) is None:
            extra["reason"] = "connection closed before an A-ASSOCIATE-RQ"
        self._record_end(assoc, outcome, **extra)

    def _record_end(self, assoc: Any, outcome: str, **extra: str) -> None:
        """Log and audit the end of an association, once."""
        with self._lock:
            if getattr(assoc, "l3spot_ended", False):
                return
            assoc.l3spot_ended = True
        counts = getattr(assoc, "l3spot_counts", {"stored": 0, "failed": 0})
        peer = self._peer(assoc)
        duration = self._duration(assoc)
        level = logging.INFO if outcome == "released" else logging.WARNING
        log_event(
            log,
            f"association_{outcome}",
            level=level,
            duration_s=duration,
            **peer,
            **counts,
            **extra,
        )
        if self.audit is not None:
            self.audit.record(
                event="association",
                outcome=outcome,
                duration_s=duration,
                **peer,
                **counts,
                **extra,
            )

    def _count(self, event: evt.Event, key: str) -> None:
        counts = getattr(event.assoc, "l3spot_counts", None)
        if counts is not None:
            counts[key] = counts.get(key, 0) + 1

    def _series_count(self, series_dir: Path, series_uid: str) -> int:
        count = self._series_counts.get(series_uid)
        if count is None:
            try:
                count = sum(1 for p in series_dir.iterdir() if p.suffix == ".dcm")
            except FileNotFoundError:
                count = 0
            self._series_counts[series_uid] = count
        return count

    def forget_series(self, series_uid: str) -> None:
        """Drop the cached instance count of a series that has completed.

        The count only guards ``node.max_series_instances`` while a series is arriving; a
        later instance of the same series recounts the files in its spool folder. Without
        this the node would keep one entry per series it ever received.
        """
        with self._lock:
            self._series_counts.pop(series_uid, None)

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE: check, write the instance durably, then answer (module docstring).

        The data set is in memory, or in its spill file when it was large
        (:class:`service.receive.ReceivedDataset`); either way it is released on return.
        """
        with ReceivedDataset(event.request.DataSet) as received:  # type: ignore[arg-type]
            return self._store(event, received)

    def _store(self, event: evt.Event, received: ReceivedDataset) -> int | Dataset:
        req = event.request
        raw = received.data
        ts = UID(event.context.transfer_syntax)
        assoc = event.assoc
        context: dict[str, Any] = {
            "calling_ae_title": str(assoc.requestor.ae_title).strip(),
            "address": assoc.requestor.address,
            "transfer_syntax": str(ts),
            "affected_sop_class_uid": str(req.AffectedSOPClassUID or ""),
            "affected_sop_instance_uid": str(req.AffectedSOPInstanceUID or ""),
        }
        if received.overflow:
            return self._refuse(
                event,
                f"instance of {received.size} bytes exceeds node.max_instance_mb="
                f"{self.config.node.max_instance_mb}",
                context,
            )
        if str(event.context.abstract_syntax) != context["affected_sop_class_uid"]:
            reason = (
                f"C-STORE of {context['affected_sop_class_uid']} on the presentation context "
                f"of {event.context.abstract_syntax}"
            )
            return self._reject(event, received, STATUS_SOP_CLASS_NOT_SUPPORTED, reason, context)
        try:
            info = inspect_dataset(raw, ts, max_inflated_bytes=self.max_inflated_bytes)
        except InflateLimitError as exc:
            return self._reject(event, received, STATUS_OUT_OF_RESOURCES, str(exc), context)
        except MalformedDatasetError as exc:
            return self._reject(event, received, STATUS_CANNOT_UNDERSTAND, str(exc), context)
        study, series, sop = info.study, info.series, info.sop_instance
        context.update(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop)
        for uid, name in (
            (study, "StudyInstanceUID"),
            (series, "SeriesInstanceUID"),
            (sop, "SOPInstanceUID"),
            (info.sop_class, "SOPClassUID"),
        ):
            if not is_valid_uid(uid):
                reason = f"missing or invalid {name} {uid!r}"
                return self._reject(event, received, STATUS_CANNOT_UNDERSTAND, reason, context)
        if sop != context["affected_sop_instance_uid"]:
            reason = "SOPInstanceUID differs from Affected SOP Instance UID"
            return self._reject(event, received, STATUS_CANNOT_UNDERSTAND, reason, context)
        if info.sop_class != context["affected_sop_class_uid"]:
            reason = "SOPClassUID differs from Affected SOP Class UID"
            return self._reject(event, received, STATUS_SOP_CLASS_MISMATCH, reason, context)
        if is_own_output(info.sop_class, info.manufacturer):
            # l3spot's own SEG/SR/SC sent back by a PACS rule that forwards whole studies
            # (a routing loop): acknowledged, not kept, no job row (core/derived.py)
            self._count(event, "own_output_ignored")
            log_event(log, "store_own_output_ignored", **context)
            return STATUS_SUCCESS

        series_dir = self.spool.series_dir(study, series)
        with self._lock:
            if sop in self._inflight:
                return self._refuse(
                    event, "same SOP Instance being stored by another association", context
                )
            owner = self.spool.sop_owner(sop)
            if owner is not None and owner != (study, series):
                reason = (
                    f"SOP Instance UID already stored in series {owner[1]} of study "
                    f"{owner[0]}; this copy came in series {series}"
                )
                return self._reject(event, received, STATUS_DUPLICATE_SOP_INSTANCE, reason, context)
            same = self.spool.same_dataset(study, series, sop, raw)
            if same is not None:
                if same:  # a re-send (e.g. after a lost response): idempotent
                    self._count(event, "stored")
                    log_event(log, "store_duplicate_identical", **context)
                    return STATUS_SUCCESS
                reason = "duplicate SOP Instance UID with different content; first copy kept"
                return self._reject(event, received, STATUS_DUPLICATE_SOP_INSTANCE, reason, context)
            if self._series_count(series_dir, series) >= self.max_series_instances:
                return self._refuse(
                    event,
                    f"series exceeds node.max_series_instances={self.max_series_instances}",
                    context,
                )
            if not self.policy.disk_ok(received.size):
                return self._refuse(event, "free disk below node.min_free_disk_mb", context)
            self._series_counts[series] = self._series_counts.get(series, 0) + 1
            self._inflight.add(sop)
        meta = file_meta_bytes(info.sop_class, sop, str(ts), context["calling_ae_title"])
        try:
            data: bytes | Path = received.path or bytes(raw)
            self.spool.write_instance(study, series, sop, [_PREAMBLE, meta, data])
        except SpoolWriteError as exc:
            with self._lock:
                self._series_counts[series] -= 1
            self._count(event, "failed")
            log_event(log, "store_failed_disk", level=logging.ERROR, error=str(exc), **context)
            return _failure(STATUS_OUT_OF_RESOURCES, "cannot write to spool")
        finally:
            with self._lock:
                self._inflight.discard(sop)
        self._count(event, "stored")
        self.on_stored(study, series, series_dir)
        return STATUS_SUCCESS

    def _refuse(self, event: evt.Event, reason: str, context: dict[str, Any]) -> Dataset:
        """0xA700 for a resource limit; not quarantined (the sender still has the data)."""
        self._count(event, "failed")
        log_event(log, "store_refused", level=logging.WARNING, reason=reason, **context)
        return _failure(STATUS_OUT_OF_RESOURCES, reason)

    def _reject(
        self,
        event: evt.Event,
        received: ReceivedDataset,
        status: int,
        reason: str,
        context: dict[str, Any],
    ) -> Dataset:
        self._count(event, "failed")
        kept: bytes | Path = received.path or bytes(received.data)
        try:
            where = str(
                self.spool.quarantine(kept, reason, {"status": f"0x{status:04X}", **context})
            )
        except OSError as exc:
            where = f"not quarantined: {exc}"
        log_event(
            log,
            "store_rejected",
            level=logging.WARNING,
            status=f"0x{status:04X}",
            reason=reason,
            quarantine=where,
            **context,
        )
        return _failure(status, reason)


def build_ae(config: Config) -> AE:
    """The application entity: every storage SOP class x every transfer syntax, plus echo.

    Parameters
    ----------
    config : ``node`` (AE title, limits, timeouts) and ``security`` (AE title checks; the
        full policy runs in :meth:`StoreHandler.handle_requested`, these are a backstop).
    """
    node = config.node
    ae = AE(ae_title=node.ae_title)
    # pynetdicom counts every connection from its accept; the SCP's own limit counts only
    # associations (PeerPolicy), connections before their request have the gate's caps
    ae.maximum_associations = node.max_associations + node.max_pending_connections
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    ae.require_called_aet = config.security.require_called_ae_title
    ae.require_calling_aet = list(config.security.allowed_calling_ae_titles)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def start_scp(
    config: Config,
    spool: Spool,
    on_stored: OnStored,
    *,
    free_bytes: FreeBytes = disk_free_bytes,
    audit: AuditLog | None = None,
) -> tuple[AE, GatedAssociationServer]:
    """Start listening on ``node.host:node.port`` in background threads.

    Parameters
    ----------
    config : the configuration (``node``, ``security``, ``logging.audit_log``).
    spool : where instances go.
    on_stored : called after each durable write.
    free_bytes : free-space function for the disk floor (tests inject one).
    audit : the audit log; default a file at :func:`service.audit.audit_log_path`.

    Returns
    -------
    (AE, server); stop with ``ae.shutdown()``. ``server.store_handler`` is the
    :class:`StoreHandler`.

    Raises
    ------
    OSError
        The port cannot be bound.
    ValueError
        TLS is enabled without the files it needs, or an allowed address is not an IP/CIDR.
    """
    netpatch.verify_pynetdicom()
    netpatch.install_reactor_clock()
    ae = build_ae(config)
    audit = audit if audit is not None else AuditLog(audit_log_path(config))
    handler = StoreHandler(spool, on_stored, config, audit, free_bytes)
    node = config.node
    server = ae.make_server(
        (node.host, node.port),
        evt_handlers=handler.handlers(),
        ssl_context=make_ssl_context(config),
        server_class=GatedAssociationServer,
    )
    server.gate = ConnectionGate(
        node.max_pending_connections,
        node.max_pending_per_address,
        node.artim_timeout_seconds,
        MAX_ASSOCIATE_RQ_BYTES,
        gate_recorder(audit, log),
    )
    threading.Thread(target=server.serve_forever, name="l3spot-scp-accept", daemon=True).start()
    netpatch.register_server(ae, server)
    netpatch.share_server_contexts(server)
    server.store_handler = handler  # type: ignore[attr-defined]  # for Node (forget_series)
    log_event(
        log,
        "scp_listening",
        ae_title=config.node.ae_title,
        host=config.node.host,
        port=server.server_address[1],
        tls=config.security.tls_enabled,
    )
    return ae, server
