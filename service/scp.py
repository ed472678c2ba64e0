"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class (pynetdicom 3).

The C-STORE handler stays small because it runs on the association's thread: it reads the
three UIDs from the received bytes (no full decode), writes preamble + File Meta
Information + the data set bytes as received (DESIGN.md: about 1.5x faster than decode +
``save_as``), fsyncs, renames, and answers:

============  ==========================================================================
``0x0000``    stored (the file is durable on disk)
``0xA700``    Refused: Out of Resources (the disk refused the write)
``0xA900``    Error: Data Set does not match SOP Class (PS3.4 Table B.2-1)
``0xC000``    Error: Cannot understand (unreadable data set or missing/invalid UIDs);
              the bytes go to quarantine with a reason file
============  ==========================================================================
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service.spool import Spool, SpoolWriteError, is_valid_uid
from worker.config import Config
from worker.logs import log_event

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: ``on_stored(study_uid, series_uid, series_dir)`` after each durable write.
OnStored = Callable[[str, str, Path], None]

_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_STUDY = 0x0020000D
_TAG_SERIES = 0x0020000E
_UID_TAGS = (_TAG_SOP_CLASS, _TAG_SOP_INSTANCE, _TAG_STUDY, _TAG_SERIES)
#: Idle sleep of pynetdicom's DUL reactor per loop (its default is 1 ms). Costs a little CPU
#: per open association; worth it for ingest latency.
DUL_IDLE_SLEEP_S = 0.0001


class UnreadableDatasetError(ValueError):
    """The received data set cannot be parsed far enough to find its UIDs."""


def read_uids(raw: bytes, transfer_syntax: UID) -> dict[str, str]:
    """SOP Class/Instance, Study and Series Instance UIDs of an encoded data set.

    Reads only up to (0020,000E), so the pixel data is never decoded or copied.

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
        The bytes are not a data set in that transfer syntax.
    """
    try:
        if transfer_syntax.is_deflated:
            raw = zlib.decompress(raw, -zlib.MAX_WBITS)
        ds = read_dataset(
            io.BytesIO(raw),
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _TAG_SERIES,
            specific_tags=[BaseTag(t) for t in _UID_TAGS],
        )
        values = {
            name: str(ds.get(tag).value or "").strip("\x00 ") if tag in ds else ""
            for name, tag in zip(
                ("sop_class", "sop_instance", "study", "series"), _UID_TAGS, strict=True
            )
        }
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDatasetError(f"cannot parse data set: {type(exc).__name__}: {exc}") from exc
    return values


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


class StoreHandler:
    """``EVT_C_STORE`` / ``EVT_C_ECHO`` / association event handlers bound to one spool.

    Parameters
    ----------
    spool : where instances are written.
    on_stored : called after each durable write (the series watcher's ``touch``).
    """

    def __init__(self, spool: Spool, on_stored: OnStored) -> None:
        self.spool = spool
        self.on_stored = on_stored

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The ``evt_handlers`` list for ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
        ]

    @staticmethod
    def handle_echo(event: evt.Event) -> int:
        """C-ECHO: always success (the node is up)."""
        return STATUS_SUCCESS

    @staticmethod
    def handle_conn_open(event: evt.Event) -> None:
        """Tune the accepted connection for many back-to-back C-STOREs.

        Disables Nagle (DESIGN.md "Known pitfalls") and shortens the DUL reactor's idle
        sleep from pynetdicom's 1 ms to :data:`DUL_IDLE_SLEEP_S`: a scanner waits for each
        response before sending the next instance, so that sleep is paid once per instance
        (measured here: about 100 -> 165 instances/s for 512 x 512 CT, bench/bench_ingest.py).
        """
        try:
            event.assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_S
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    @staticmethod
    def handle_accepted(event: evt.Event) -> None:
        """Audit: an association was accepted."""
        assoc = event.assoc
        assoc.l3spot_counts = {"stored": 0, "failed": 0}  # type: ignore[attr-defined]
        log_event(
            log,
            "association_accepted",
            calling_ae_title=assoc.requestor.ae_title,
            address=assoc.requestor.address,
            port=assoc.requestor.port,
        )

    @staticmethod
    def handle_closed(event: evt.Event) -> None:
        """Audit: an association ended (released or aborted) with its counts."""
        assoc = event.assoc
        counts = getattr(assoc, "l3spot_counts", {"stored": 0, "failed": 0})
        log_event(
            log,
            "association_released" if event.event is evt.EVT_RELEASED else "association_aborted",
            calling_ae_title=assoc.requestor.ae_title,
            address=assoc.requestor.address,
            **counts,
        )

    def _count(self, event: evt.Event, key: str) -> None:
        counts = getattr(event.assoc, "l3spot_counts", None)
        if counts is not None:
            counts[key] += 1

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE: write the instance durably, then answer (see the module docstring)."""
        req = event.request
        raw: bytes = req.DataSet.getvalue()  # type: ignore[union-attr]
        ts = UID(event.context.transfer_syntax)
        context: dict[str, Any] = {
            "calling_ae_title": event.assoc.requestor.ae_title,
            "address": event.assoc.requestor.address,
            "transfer_syntax": str(ts),
            "affected_sop_class_uid": str(req.AffectedSOPClassUID or ""),
            "affected_sop_instance_uid": str(req.AffectedSOPInstanceUID or ""),
        }
        try:
            uids = read_uids(raw, ts)
        except UnreadableDatasetError as exc:
            return self._reject(event, raw, STATUS_CANNOT_UNDERSTAND, str(exc), context)
        context.update(
            study_instance_uid=uids["study"],
            series_instance_uid=uids["series"],
            sop_instance_uid=uids["sop_instance"],
        )
        for key, name in (
            ("study", "StudyInstanceUID"),
            ("series", "SeriesInstanceUID"),
            ("sop_instance", "SOPInstanceUID"),
        ):
            if not is_valid_uid(uids[key]):
                reason = f"missing or invalid {name} {uids[key]!r}"
                return self._reject(event, raw, STATUS_CANNOT_UNDERSTAND, reason, context)
        if uids["sop_instance"] != context["affected_sop_instance_uid"]:
            reason = "SOPInstanceUID differs from Affected SOP Instance UID"
            return self._reject(event, raw, STATUS_CANNOT_UNDERSTAND, reason, context)
        if uids["sop_class"] and uids["sop_class"] != context["affected_sop_class_uid"]:
            reason = "SOPClassUID differs from Affected SOP Class UID"
            return self._reject(event, raw, STATUS_SOP_CLASS_MISMATCH, reason, context)

        meta = io.BytesIO()
        write_file_meta_info(meta, event.file_meta, enforce_standard=True)
        try:
            self.spool.write_instance(
                uids["study"],
                uids["series"],
                uids["sop_instance"],
                [b"\x00" * 128, b"DICM", meta.getvalue(), raw],
            )
        except SpoolWriteError as exc:
            self._count(event, "failed")
            log_event(log, "store_failed_disk", level=logging.ERROR, error=str(exc), **context)
            return _failure(STATUS_OUT_OF_RESOURCES, "cannot write to spool")
        self._count(event, "stored")
        self.on_stored(
            uids["study"], uids["series"], self.spool.series_dir(uids["study"], uids["series"])
        )
        return STATUS_SUCCESS

    def _reject(
        self, event: evt.Event, raw: bytes, status: int, reason: str, context: dict[str, Any]
    ) -> Dataset:
        self._count(event, "failed")
        try:
            where = str(self.spool.quarantine(raw, reason, context))
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


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS context from ``security`` (DICOM TLS, PS3.15 Annex B.9), or None."""
    sec = config.security
    if not sec.tls_enabled:
        return None
    if sec.tls_certificate is None or sec.tls_private_key is None:
        raise ValueError("security.tls_enabled needs tls_certificate and tls_private_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(sec.tls_certificate), str(sec.tls_private_key))
    if sec.tls_ca_certificate is not None:
        ctx.load_verify_locations(str(sec.tls_ca_certificate))
    ctx.verify_mode = ssl.CERT_REQUIRED if sec.tls_require_client_certificate else ssl.CERT_NONE
    return ctx


def build_ae(config: Config) -> AE:
    """The application entity: every storage SOP class x every transfer syntax, plus echo.

    Parameters
    ----------
    config : ``node`` (AE title, limits, timeouts) and ``security`` (AE title checks).
    """
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
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
    config: Config, spool: Spool, on_stored: OnStored
) -> tuple[AE, ThreadedAssociationServer]:
    """Start listening on ``node.host:node.port`` in background threads.

    Returns
    -------
    (AE, server); stop with ``ae.shutdown()``.

    Raises
    ------
    OSError
        The port cannot be bound.
    """
    ae = build_ae(config)
    handler = StoreHandler(spool, on_stored)
    server = ae.start_server(
        (config.node.host, config.node.port),
        block=False,
        evt_handlers=handler.handlers(),
        ssl_context=make_ssl_context(config),
    )
    log_event(
        log,
        "scp_listening",
        ae_title=config.node.ae_title,
        host=config.node.host,
        port=server.server_address[1],
    )
    return ae, server
