"""Connections before their A-ASSOCIATE-RQ: admitted, timed and dismissed by l3spot.

A TCP connection is not an association until its A-ASSOCIATE-RQ has arrived (PS3.8 section
9.2, state Sta2). pynetdicom counts every connection against ``maximum_associations`` from
the moment it is accepted and reads the request with per-``recv`` socket timeouts, so ten
peers that connect and send nothing, or that send their request one byte a second, held
every association place a scanner needed; junk and closed sockets held theirs for the
30 s ACSE timeout (issue 16). Here, before pynetdicom sees a connection:

* **caps**: at most ``node.max_pending_connections`` connections without a complete
  A-ASSOCIATE-RQ, and ``node.max_pending_per_address`` from one source address; one more is
  closed at once (``refused``);
* **ARTIM** (PS3.8 section 9.1.5): the TLS handshake (when TLS is on) and the complete
  A-ASSOCIATE-RQ must arrive within ``node.artim_timeout_seconds`` of the connection, an
  absolute deadline that trickling cannot stretch; on expiry the connection is closed
  (Sta2 + Evt18 -> AA-2);
* **junk**: a first PDU that is not an A-ASSOCIATE-RQ (or announces an impossible length)
  gets an A-ABORT (source: service provider, reason: unrecognised or unexpected PDU; Sta2 +
  Evt19 -> AA-1) and is closed at once, without the ARTIM wait of Sta13;
* a peer that closes is noticed at once.

Each such connection leaves one audit record (``event: connection``, ``outcome: refused``
or ``closed``, the reason) and one log line. A complete request is handed to pynetdicom
with the bytes already read (:func:`core.netpatch.replay_received`); only then does the
association count against ``node.max_associations`` (:class:`service.security.PeerPolicy`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from core import netpatch
from core.errors import L3SpotError
from core.logs import log_event

__all__ = [
    "ASSOCIATE_RQ_MIN_LENGTH",
    "ConnectionGate",
    "GateRefusalError",
    "GatedAssociationServer",
    "read_associate_rq",
]

log = logging.getLogger(__name__)

#: PDU type of an A-ASSOCIATE-RQ (PS3.8 section 9.3.2).
ASSOCIATE_RQ = 0x01
#: Smallest A-ASSOCIATE-RQ PDU length: protocol version, reserved, called and calling AE
#: titles and 32 reserved bytes (PS3.8 Table 9-11), before any variable item.
ASSOCIATE_RQ_MIN_LENGTH = 68
#: PDU types PS3.8 defines; any other is "unrecognised" (A-ABORT reason 1), a defined one
#: other than an A-ASSOCIATE-RQ is "unexpected" in Sta2 (reason 2).
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
A_ABORT_PDU_TYPE = 0x07


class GateRefusalError(L3SpotError):
    """A connection that does not become an association, and why.

    Attributes
    ----------
    reason : one line for the audit record and the log.
    abort_reason : A-ABORT reason/diag to send before closing (PS3.8 Table 9-26), or None.
    """

    def __init__(self, reason: str, abort_reason: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort_reason = abort_reason


def _wait(sock: socket.socket, deadline: float, write: bool = False) -> bool:
    """Wait until ``sock`` is readable (or writable); False when the deadline passed."""
    if not write and isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], remaining)
    return bool(r or w)


def _tls_handshake(sock: ssl.SSLSocket, deadline: float, artim_s: float) -> None:
    """Complete a server-side TLS handshake by ``deadline`` (socket non-blocking)."""
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            ok = _wait(sock, deadline)
        except ssl.SSLWantWriteError:
            ok = _wait(sock, deadline, write=True)
        except (ssl.SSLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise GateRefusalError(f"TLS handshake failed: {why}") from exc
        if not ok:
            raise GateRefusalError(f"TLS handshake not complete within ARTIM {artim_s:g} s")


def read_associate_rq(
    sock: socket.socket, deadline: float, artim_s: float, max_length: int
) -> bytes:
    """Read one complete A-ASSOCIATE-RQ PDU from a new connection by ``deadline``.

    Parameters
    ----------
    sock : the accepted socket (an ``ssl.SSLSocket`` after its handshake); it is left in
        non-blocking mode.
    deadline : ``time.monotonic()`` by which the whole PDU must have arrived (ARTIM).
    artim_s : the ARTIM time, for the messages.
    max_length : largest PDU length accepted (bytes after the 6-byte header).

    Returns
    -------
    bytes
        The PDU, header included (PS3.8 section 9.3.2).

    Raises
    ------
    GateRefusalError
        Closed by the peer, not an A-ASSOCIATE-RQ, an impossible length, or not complete
        by the deadline.
    """
    sock.setblocking(False)
    buf = bytearray()
    need = 6
    while len(buf) < need:
        if not _wait(sock, deadline):
            if not buf:
                raise GateRefusalError(f"no A-ASSOCIATE-RQ within ARTIM {artim_s:g} s")
            raise GateRefusalError(
                f"A-ASSOCIATE-RQ incomplete after ARTIM {artim_s:g} s ({len(buf)} of {need} bytes)"
            )
        try:
            chunk = sock.recv(min(need - len(buf), 65536))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            continue
        except OSError as exc:
            raise GateRefusalError(
                f"connection reset before an A-ASSOCIATE-RQ ({len(buf)} bytes)"
            ) from exc
        if not chunk:
            raise GateRefusalError(f"connection closed before an A-ASSOCIATE-RQ ({len(buf)} bytes)")
        buf += chunk
        if need == 6 and len(buf) >= 6:
            pdu_type, length = buf[0], int.from_bytes(buf[2:6], "big")
            if pdu_type == A_ABORT_PDU_TYPE:
                raise GateRefusalError("not an A-ASSOCIATE-RQ: A-ABORT before association")
            if pdu_type != ASSOCIATE_RQ:
                raise GateRefusalError(
                    f"not an A-ASSOCIATE-RQ (PDU type 0x{pdu_type:02X})",
                    abort_reason=0x02 if pdu_type in KNOWN_PDU_TYPES else 0x01,
                )
            if not ASSOCIATE_RQ_MIN_LENGTH <= length <= max_length:
                raise GateRefusalError(
                    f"not an A-ASSOCIATE-RQ: length {length} outside "
                    f"{ASSOCIATE_RQ_MIN_LENGTH}-{max_length}",
                    abort_reason=0x06,  # invalid PDU parameter value
                )
            need = 6 + length
    return bytes(buf)


@dataclass
class _Pending:
    address: str
    port: int
    t0: float


class ConnectionGate:
    """Admission of connections that have not yet sent their A-ASSOCIATE-RQ.

    Parameters
    ----------
    max_total, max_per_address : the caps (``node.max_pending_connections``,
        ``node.max_pending_per_address``).
    artim_s : ``node.artim_timeout_seconds``.
    max_rq_length : largest A-ASSOCIATE-RQ PDU length read.
    record : ``record(outcome, reason, address, port, tls, duration_s)``: audit + log.
    """

    def __init__(
        self,
        max_total: int,
        max_per_address: int,
        artim_s: float,
        max_rq_length: int,
        record: Callable[..., None],
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.artim_s = artim_s
        self.max_rq_length = max_rq_length
        self.record = record
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._per_address: Counter[str] = Counter()
        self._next = 0

    def pending(self) -> int:
        """Connections now waiting for their A-ASSOCIATE-RQ."""
        with self._lock:
            return len(self._pending)

    def admit(self, address: str, port: int) -> int | None:
        """Register a new connection; its ticket, or None when a cap refuses it."""
        with self._lock:
            if len(self._pending) >= self.max_total:
                why = f"node.max_pending_connections={self.max_total} reached"
            elif self._per_address[address] >= self.max_per_address:
                why = f"node.max_pending_per_address={self.max_per_address} reached for {address}"
            else:
                self._next += 1
                self._pending[self._next] = _Pending(address, port, time.monotonic())
                self._per_address[address] += 1
                return self._next
        self.record("refused", why, address, port, 0.0)
        return None

    def release(self, ticket: int) -> float:
        """Forget a connection (request complete, or closed); seconds it was pending."""
        with self._lock:
            p = self._pending.pop(ticket, None)
            if p is None:
                return 0.0
            self._per_address[p.address] -= 1
            if self._per_address[p.address] <= 0:
                del self._per_address[p.address]
            return time.monotonic() - p.t0

    def await_request(self, sock: socket.socket) -> bytes:
        """TLS handshake (if any) and the complete A-ASSOCIATE-RQ, within ARTIM.

        Returns the PDU bytes; the socket is back in its original blocking mode.

        Raises
        ------
        GateRefusalError
            See :func:`read_associate_rq`; an A-ABORT has been sent where due.
        """
        timeout = sock.gettimeout()
        deadline = time.monotonic() + self.artim_s
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.setblocking(False)
                _tls_handshake(sock, deadline, self.artim_s)
            pdu = read_associate_rq(sock, deadline, self.artim_s, self.max_rq_length)
        except GateRefusalError as refusal:
            if refusal.abort_reason is not None:
                # A-ABORT PDU: type 7, reserved, length 4, reserved x2, source 2 (provider)
                abort = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, refusal.abort_reason])
                with contextlib.suppress(OSError, ssl.SSLError):
                    sock.send(abort)
            raise
        sock.settimeout(timeout)
        return pdu


class GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler, given the A-ASSOCIATE-RQ the gate already read."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        pdu = self.server.take_request_bytes(self.request)  # type: ignore[attr-defined]
        if pdu:
            netpatch.replay_received(assoc.dul.socket, pdu)
        return assoc


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind a :class:`ConnectionGate` (module docstring).

    Create it with ``ae.make_server(..., server_class=GatedAssociationServer)`` and set
    :attr:`gate` before serving. TLS sockets come wrapped without their handshake
    (:func:`service.security.make_ssl_context`); it runs on the connection's own thread
    under the ARTIM deadline.
    """

    gate: ConnectionGate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", GatedRequestHandler)
        super().__init__(*args, **kwargs)
        self._request_bytes: dict[int, bytes] = {}
        self._tickets: dict[int, int] = {}
        self._bytes_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accepting thread: refuse at once beyond a cap, else start its thread."""
        ticket = self.gate.admit(str(client_address[0]), int(client_address[1]))
        if ticket is None:
            self.shutdown_request(request)
            return
        with self._bytes_lock:
            self._tickets[id(request)] = ticket
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """On the connection's thread: wait for the request under ARTIM, then pynetdicom."""
        with self._bytes_lock:
            ticket = self._tickets.pop(id(request), 0)
        address, port = str(client_address[0]), int(client_address[1])
        try:
            pdu = self.gate.await_request(request)
        except GateRefusalError as refusal:
            took = self.gate.release(ticket)
            self.shutdown_request(request)
            tls = isinstance(request, ssl.SSLSocket)
            self.gate.record("closed", refusal.reason, address, port, took, tls=tls)
            return
        except Exception:  # never let one connection take the server down
            self.gate.release(ticket)
            self.shutdown_request(request)
            raise
        self.gate.release(ticket)
        with self._bytes_lock:
            self._request_bytes[id(request)] = pdu
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._bytes_lock:
                self._request_bytes.pop(id(request), None)

    def take_request_bytes(self, request: Any) -> bytes | None:
        """The A-ASSOCIATE-RQ read for ``request`` (once)."""
        with self._bytes_lock:
            return self._request_bytes.pop(id(request), None)


def gate_recorder(audit: Any, logger: logging.Logger = log) -> Callable[..., None]:
    """``record(outcome, reason, address, port, duration_s, tls=False)``: log + audit."""

    def record(
        outcome: str, reason: str, address: str, port: int, duration_s: float, tls: bool = False
    ) -> None:
        fields = {
            "reason": reason,
            "address": address,
            "port": port,
            "tls": tls,
            "duration_s": round(duration_s, 3),
        }
        log_event(logger, f"connection_{outcome}", level=logging.WARNING, **fields)
        if audit is not None:
            audit.record(event="connection", outcome=outcome, **fields)

    return record
