"""DICOMweb, the parts both processes need: the HTTP session of a destination and its probe.

A DICOMweb destination (:class:`core.config.DicomwebDestination`) receives the results by
STOW-RS (PS3.18 10.5; the sender is :mod:`worker.stow`). This module holds what the sender
and the node's checks share:

* :func:`http_session`: one ``requests`` session with the destination's authentication
  (a bearer token, RFC 6750, or HTTP basic, RFC 7617, the secret read from the environment
  or a file at each use) and its TLS settings;
* :func:`request_failure` and :func:`http_status_text`: what went wrong, in the words an
  operator checks first (connection refused, name does not resolve, timeout, TLS, the HTTP
  status and its meaning);
* :func:`qido_probe_url`: the request of the HTTP counterpart of a C-ECHO, a QIDO-RS search
  for one study (PS3.18 10.6); :func:`core.echo.probe_dicomweb` sends it and answers as a
  C-ECHO does, so ``/readyz``, the destinations page and the start-up check treat both
  kinds alike.

``requests`` is imported when a request is made, not with this module.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Iterator
from enum import StrEnum
from http import HTTPStatus
from typing import TYPE_CHECKING

from core.config import DicomwebDestination
from core.errors import L3SpotError

if TYPE_CHECKING:
    import requests

__all__ = [
    "CredentialsError",
    "HttpFailure",
    "http_session",
    "http_status_text",
    "qido_probe_url",
    "read_secret",
    "request_failure",
    "request_timeout",
]

#: Media type of the JSON answers we ask for (PS3.18 8.7.3.2: DICOM JSON, Annex F).
DICOM_JSON = "application/dicom+json"

#: What an operator should check for the HTTP statuses a DICOMweb server commonly answers.
_STATUS_HINTS = {
    401: "the server refused our credentials; check the destination's auth and secret",
    403: "the credentials are valid but may not store here (the server's permissions)",
    404: "no DICOMweb service at this URL; check the destination's url",
    405: "the URL does not accept this method; is it the DICOMweb base URL?",
    413: "the server refuses a request this large",
    415: "the server does not accept application/dicom, PS3.18 10.5.1.2.1",
    429: "the server asks us to slow down",
    502: "a proxy in front of the server got no valid answer from it",
    503: "the server is temporarily unable to serve (maintenance or overload)",
    504: "a proxy in front of the server got no answer in time",
}


class CredentialsError(L3SpotError):
    """The secret of a DICOMweb destination cannot be read (variable unset, file missing)."""


class HttpFailure(StrEnum):
    """Why an HTTP request got no answer (the network and TLS layers)."""

    DNS = "dns_failure"  # the host name does not resolve
    REFUSED = "connection_refused"  # nothing listens on host:port (ECONNREFUSED)
    CONNECT_TIMEOUT = "connect_timeout"  # no TCP connection in time
    READ_TIMEOUT = "read_timeout"  # connected and sent, no answer in time
    TLS = "tls_failure"  # the TLS handshake failed (certificate, protocol)
    NETWORK = "network_error"  # unreachable, connection reset or closed, proxy, ...


def read_secret(dest: DicomwebDestination) -> str | None:
    """The bearer token or basic password of ``dest``, read now (None for ``auth: none``).

    Raises
    ------
    CredentialsError
        The environment variable is unset or empty, or the file cannot be read or is empty.
        The message names the variable or the file, never the secret.
    """
    if dest.auth == "none":
        return None
    if dest.secret_env is not None:
        value = os.environ.get(dest.secret_env, "").strip()
        if not value:
            raise CredentialsError(
                f"{dest.label}: the environment variable {dest.secret_env} (secret_env) is "
                "not set or empty"
            )
        return value
    assert dest.secret_file is not None  # the configuration requires one of the two
    try:
        value = dest.secret_file.read_text().strip()
    except OSError as exc:
        raise CredentialsError(
            f"{dest.label}: cannot read secret_file {dest.secret_file}: {exc.strerror or exc}"
        ) from exc
    if not value:
        raise CredentialsError(f"{dest.label}: secret_file {dest.secret_file} is empty")
    return value


def request_timeout(dest: DicomwebDestination, default_s: float) -> float:
    """Connect and read timeout (s) of one request: ``dest.timeout_seconds`` or the default."""
    return dest.timeout_seconds if dest.timeout_seconds is not None else default_s


def http_session(dest: DicomwebDestination) -> requests.Session:
    """A ``requests`` session carrying ``dest``'s authentication and TLS settings.

    Parameters
    ----------
    dest : the destination.

    Returns
    -------
    requests.Session
        ``Authorization: Bearer <token>`` or basic authentication, ``Accept:
        application/dicom+json``, and certificate verification as configured (the CA bundle
        ``tls_ca_certificate``, the system CAs, or none with ``tls_verify: false``).

    Raises
    ------
    CredentialsError
        The secret cannot be read (:func:`read_secret`).
    """
    import requests

    secret = read_secret(dest)
    session = requests.Session()
    session.headers["Accept"] = DICOM_JSON
    if dest.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {secret}"
    elif dest.auth == "basic":
        session.auth = (dest.username or "", secret or "")
    if not dest.tls_verify:
        session.verify = False
    elif dest.tls_ca_certificate is not None:
        session.verify = str(dest.tls_ca_certificate)
    return session


def http_status_text(code: int) -> str:
    """``HTTP 503 Service Unavailable``, and what to check for the common failures."""
    try:
        text = f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        text = f"HTTP {code}"
    hint = _STATUS_HINTS.get(code)
    return f"{text}: {hint}" if hint else text


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (``reason``, ``__cause__``, ``__context__``,
    exception arguments): urllib3 and requests nest the socket error several levels down."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nested = [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
        todo += [n for n in nested if isinstance(n, BaseException)]


def request_failure(exc: BaseException, url: str, timeout_s: float) -> tuple[HttpFailure, str]:
    """Why a request to ``url`` got no HTTP answer, from a ``requests`` exception.

    Parameters
    ----------
    exc : what ``requests`` raised (``ConnectionError``, ``Timeout``, ``SSLError``, ...).
    url : the destination's base URL (its host and port are named in the text).
    timeout_s : the timeout the request ran with (s).

    Returns
    -------
    (HttpFailure, str)
        The failure's kind and one line for an operator (never the secret: the URL carries
        none, and the request's headers are not quoted).
    """
    import requests
    from urllib3.util import parse_url

    parsed = parse_url(url)
    where = f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
    causes = list(_causes(exc))
    if isinstance(exc, requests.exceptions.SSLError):
        text = " ".join(str(c) for c in causes[-1:]) or str(exc)
        m = re.search(r"\[SSL[^\]]*\]\s*([^(')\"]+)", str(exc))
        why = m.group(1).strip() if m else text
        return HttpFailure.TLS, f"TLS handshake with {where} failed: {why}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return HttpFailure.CONNECT_TIMEOUT, (
            f"no answer to the TCP connection to {where} within {timeout_s:g} s (host down, or "
            "a firewall drops the packets)"
        )
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return HttpFailure.READ_TIMEOUT, f"no HTTP response from {where} within {timeout_s:g} s"
    for c in causes:
        if isinstance(c, ConnectionRefusedError):
            return HttpFailure.REFUSED, (
                f"connection refused by {where} (nothing listens there: the server is down or "
                "the port is wrong)"
            )
        if isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError":
            return HttpFailure.DNS, f"host name {parsed.host!r} does not resolve (DNS)"
        if isinstance(c, OSError) and c.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return HttpFailure.NETWORK, f"{where} is unreachable ({c.strerror})"
        if isinstance(c, TimeoutError | socket.timeout):
            return HttpFailure.CONNECT_TIMEOUT, (
                f"no answer to the TCP connection to {where} within {timeout_s:g} s"
            )
    for c in causes:
        if type(c).__name__ in ("RemoteDisconnected", "ConnectionResetError", "ProtocolError"):
            return HttpFailure.NETWORK, (
                f"{where} closed the connection without an HTTP response ({type(c).__name__})"
            )
    return HttpFailure.NETWORK, f"cannot reach {where}: {type(exc).__name__}"


def qido_probe_url(dest: DicomwebDestination) -> tuple[str, dict[str, str]]:
    """The probe request: Search for Studies, one match at most (PS3.18 10.6.1).

    Returns
    -------
    (url, params)
        ``{url}/studies`` and ``{"limit": "1"}``.
    """
    return f"{dest.url}/studies", {"limit": "1"}
