"""C-ECHO SCU (Verification Service Class, PS3.4 Annex A): is a DICOM node there, and how fast?

One function, :func:`echo_scp`, for every place that asks: ``l3spot echo`` (the container
health check), the readiness check of the destinations (``/readyz``) and the web page's
C-ECHO test button. It never raises for a peer that is not there: it says what happened,
in the words an operator checks first (refused, timed out, rejected and why, aborted).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.netpatch import guard_scu_reactor

#: Our AE title of ``l3spot echo`` when none is given.
DEFAULT_CALLING_AE = "L3SPOT_ECHO"


class EchoOutcome(StrEnum):
    """What a C-ECHO came to (the strings are shown on the page and in ``/readyz``)."""

    SUCCESS = "success"  # association accepted, C-ECHO status 0x0000
    REFUSED = "connection refused"  # no TCP connection (nothing listens, or unreachable)
    UNKNOWN_HOST = "unknown host"  # the host name does not resolve
    TIMEOUT = "timeout"  # no TCP connection, A-ASSOCIATE-AC or C-ECHO response in time
    REJECTED = "association rejected"  # A-ASSOCIATE-RJ (PS3.8 9.3.4): AE title, limits
    ABORTED = "association aborted"  # A-ABORT, connection closed, or Verification refused
    FAILED = "failed"  # a C-ECHO response with a status other than Success


def connect_address(bind_host: str) -> str:
    """The address to reach a local server bound to ``bind_host`` (a wildcard -> loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


@dataclass(frozen=True)
class EchoResult:
    """The answer of one C-ECHO.

    Attributes
    ----------
    outcome : what happened.
    detail : one line for an operator (rejection result/source/reason, status code).
    rtt_ms : milliseconds from the connection attempt to the C-ECHO response (association
        included, release not); None when no response came.
    status : the C-ECHO response's Status (0x0000 = Success), None when none came.
    at : Unix time (s) the attempt started.
    """

    outcome: EchoOutcome
    detail: str
    rtt_ms: float | None = None
    status: int | None = None
    at: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the peer answered the C-ECHO with Success."""
        return self.outcome is EchoOutcome.SUCCESS

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``/readyz``)."""
        return {
            "ok": self.ok,
            "outcome": str(self.outcome),
            "detail": self.detail,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 1),
            "at": self.at,
        }


def echo_scp(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout_s: float = 10.0,
) -> EchoResult:
    """Associate with ``called_ae@host:port``, send one C-ECHO, release.

    Parameters
    ----------
    host : host name or address of the peer.
    port : its DICOM port.
    called_ae : the peer's AE title.
    calling_ae : ours.
    timeout_s : TCP connect, ACSE (A-ASSOCIATE-AC), DIMSE (C-ECHO-RSP) and network
        timeout, each in seconds; the whole exchange takes at most about twice this.

    Returns
    -------
    EchoResult
        The outcome; never raises for an unreachable or unwilling peer.
    """
    started = time.time()
    t0 = time.perf_counter()
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return EchoResult(EchoOutcome.UNKNOWN_HOST, f"{host}: {exc}", at=started)

    seen: dict[str, Any] = {}
    lock = threading.Lock()

    def on_open(event: evt.Event) -> None:
        with lock:
            seen["open"] = True

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if getattr(primitive, "result", None) in (0x01, 0x02):  # A-ASSOCIATE-RJ
            with lock:
                seen["reject"] = (
                    f"{primitive.result_str}, source: {primitive.source_str},"
                    f" reason: {primitive.reason_str}"
                )

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)],
    )
    elapsed = time.perf_counter() - t0
    if not assoc.is_established:
        with lock:
            opened, reject = bool(seen.get("open")), seen.get("reject")
        if reject is not None or assoc.is_rejected:
            return EchoResult(EchoOutcome.REJECTED, reject or "rejected", at=started)
        if not opened:
            if elapsed >= 0.9 * timeout_s:
                return EchoResult(
                    EchoOutcome.TIMEOUT, f"no TCP connection within {timeout_s:g} s", at=started
                )
            return EchoResult(EchoOutcome.REFUSED, f"cannot connect to {host}:{port}", at=started)
        if elapsed >= 0.9 * timeout_s:
            return EchoResult(
                EchoOutcome.TIMEOUT, f"no association answer within {timeout_s:g} s", at=started
            )
        return EchoResult(
            EchoOutcome.ABORTED,
            "the peer aborted or closed the connection (or refused Verification)",
            at=started,
        )
    guard_scu_reactor(assoc)  # pynetdicom 3.0.4 race, see docs/reliability.md
    try:
        rsp = assoc.send_c_echo()
        rtt_ms = (time.perf_counter() - t0) * 1000.0
        code = int(rsp.Status) if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    if code is None:
        if (time.perf_counter() - t0) - elapsed >= 0.9 * timeout_s:
            return EchoResult(
                EchoOutcome.TIMEOUT, f"no C-ECHO response within {timeout_s:g} s", at=started
            )
        return EchoResult(EchoOutcome.ABORTED, "aborted before the C-ECHO response", at=started)
    if code != 0x0000:
        return EchoResult(
            EchoOutcome.FAILED, f"C-ECHO status 0x{code:04X}", rtt_ms, code, at=started
        )
    return EchoResult(EchoOutcome.SUCCESS, f"answered in {rtt_ms:.0f} ms", rtt_ms, code, started)
