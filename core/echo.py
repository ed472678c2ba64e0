"""C-ECHO SCU (Verification Service Class, PS3.4 Annex A): is a DICOM node there, and how fast?

One function, :func:`echo_scp`, for every place that asks: ``l3spot echo`` (the container
health check), the readiness check of the destinations (``/readyz``) and the web page's
C-ECHO test button. It never raises for a peer that is not there: it says what happened,
in the words an operator checks first (refused, timed out, rejected and why, aborted).

An export destination is checked with :func:`probe_destination`: C-ECHO for a C-STORE SCP,
a QIDO-RS request (:func:`probe_dicomweb`) for a DICOMweb service, both answered as an
:class:`EchoResult`.
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

from core.config import AnyDestination, DicomwebDestination
from core.dicomweb import (
    CredentialsError,
    HttpFailure,
    http_session,
    http_status_text,
    qido_probe_url,
    request_failure,
)
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
    FAILED = "failed"  # a C-ECHO response with a status other than Success (HTTP: not 2xx)
    TLS = "TLS failure"  # DICOMweb: the TLS handshake failed (certificate, protocol)


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
    status : the C-ECHO response's Status (0x0000 = Success), or the HTTP status code of a
        DICOMweb probe; None when none came.
    at : Unix time (s) the attempt started.
    check : what was tried, as the page and ``/readyz`` name it (``C-ECHO``, ``QIDO-RS``).
    """

    outcome: EchoOutcome
    detail: str
    rtt_ms: float | None = None
    status: int | None = None
    at: float = 0.0
    check: str = "C-ECHO"

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
            "check": self.check,
        }


#: What :func:`probe_destination` runs for each kind of destination, as the page names it.
CHECK_NAMES = {"dimse": "C-ECHO", "dicomweb": "QIDO-RS"}


def check_name(dest: AnyDestination) -> str:
    """``C-ECHO`` or ``QIDO-RS``: the test :func:`probe_destination` runs for ``dest``."""
    return CHECK_NAMES[dest.kind]


def probe_destination(
    dest: AnyDestination, calling_ae: str = DEFAULT_CALLING_AE, timeout_s: float = 10.0
) -> EchoResult:
    """Is an export destination there? C-ECHO for a C-STORE SCP, QIDO-RS for DICOMweb.

    Parameters
    ----------
    dest : the destination (``export.destinations[]``).
    calling_ae : our AE title (C-ECHO only).
    timeout_s : the check's timeout (s), as in :func:`echo_scp` and
        :func:`core.dicomweb.probe_dicomweb`.

    Returns
    -------
    EchoResult
        ``check`` says which test ran; never raises for an unreachable or unwilling peer.
    """
    if isinstance(dest, DicomwebDestination):
        return probe_dicomweb(dest, timeout_s)
    return echo_scp(dest.host, dest.port, dest.ae_title, calling_ae, timeout_s)


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


#: How a request failure shows as a probe outcome (the page's and /readyz's words).
_PROBE_OUTCOMES = {
    HttpFailure.DNS: EchoOutcome.UNKNOWN_HOST,
    HttpFailure.REFUSED: EchoOutcome.REFUSED,
    HttpFailure.CONNECT_TIMEOUT: EchoOutcome.TIMEOUT,
    HttpFailure.READ_TIMEOUT: EchoOutcome.TIMEOUT,
    HttpFailure.TLS: EchoOutcome.TLS,
    HttpFailure.NETWORK: EchoOutcome.ABORTED,
}


def probe_dicomweb(dest: DicomwebDestination, timeout_s: float = 10.0) -> EchoResult:
    """Is the DICOMweb service there, and do our credentials work? One QIDO-RS request.

    ``GET {url}/studies?limit=1`` (PS3.18 10.6.1, Search for Studies) with the destination's
    authentication; the answer's body (which may describe a patient's study) is not read.
    Any 2xx (200 with a match, 204 without) is success: the service answers searches with
    our credentials, so it is up.

    Parameters
    ----------
    dest : the destination.
    timeout_s : connect and read timeout (s); ``dest.timeout_seconds`` does not apply
        (the page's and ``/readyz``'s own timeout does).

    Returns
    -------
    EchoResult
        Its ``check`` is ``"QIDO-RS"``; ``status`` is the HTTP status code (None when no
        answer came); never raises for a server that is not there or refuses us.
    """
    import requests

    started = time.time()
    t0 = time.perf_counter()

    def result(outcome: EchoOutcome, detail: str, **kw: Any) -> EchoResult:
        return EchoResult(outcome, detail, at=started, check=CHECK_NAMES["dicomweb"], **kw)

    try:
        session = http_session(dest)
    except CredentialsError as exc:
        return result(EchoOutcome.FAILED, str(exc))
    try:
        url, params = qido_probe_url(dest)
        with session, session.get(url, params=params, timeout=timeout_s, stream=True) as rsp:
            code = rsp.status_code
    except requests.RequestException as exc:
        kind, why = request_failure(exc, dest.url, timeout_s)
        return result(_PROBE_OUTCOMES[kind], why)
    rtt_ms = (time.perf_counter() - t0) * 1000.0
    if 200 <= code < 300:
        return result(
            EchoOutcome.SUCCESS,
            f"HTTP {code}, answered in {rtt_ms:.0f} ms",
            rtt_ms=rtt_ms,
            status=code,
        )
    return result(EchoOutcome.FAILED, http_status_text(code), rtt_ms=rtt_ms, status=code)
