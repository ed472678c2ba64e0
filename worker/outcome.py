"""What one delivery attempt came to, whatever the protocol (C-STORE or STOW-RS).

:func:`worker.export.send_results` (C-STORE) and :func:`worker.stow.send_stow` (STOW-RS)
both answer an :class:`ExportOutcome`, so :func:`worker.tasks.run_export` retries, records
and logs every kind of destination the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FailureKind(StrEnum):
    """Why an attempt failed, from the network up (a StrEnum: logged as its string)."""

    DNS = "dns_failure"  # the host name does not resolve
    CONNECTION_REFUSED = "connection_refused"  # nothing listens on host:port (ECONNREFUSED)
    CONNECT_TIMEOUT = "connect_timeout"  # no answer to the TCP connection (host down, firewall)
    NETWORK = "network_error"  # no route to the host, network unreachable, ...
    ASSOCIATION_TIMEOUT = "association_timeout"  # connected, no A-ASSOCIATE-AC/RJ in time
    REJECTED = "association_rejected"  # A-ASSOCIATE-RJ (PS3.8 Table 9-21)
    ABORTED = "association_aborted"  # A-ABORT from the peer, or A-P-ABORT (connection lost)
    NO_CONTEXT = "no_presentation_context"  # the PACS accepts none of our SOP classes/syntaxes
    # a C-STORE answered a failure status; STOW-RS: instances not stored (202 with a
    # FailedSOPSequence, 400/409/415 ...: PS3.18 Table 10.5.3-1)
    STORE_STATUS = "store_status"
    NO_STORE_RESPONSE = "no_store_response"  # no C-STORE/STOW-RS response (timeout or abort)
    TLS = "tls_failure"  # DICOMweb: the TLS handshake failed (certificate, protocol)
    UNAUTHORIZED = "http_unauthorized"  # DICOMweb: HTTP 401/403, our credentials are refused
    HTTP_STATUS = "http_status"  # DICOMweb: another HTTP error (404, 429, 5xx ...)
    CREDENTIALS = "credentials_unavailable"  # DICOMweb: the secret's variable or file is missing


#: Failures after which the destination still counts as reached: it associated and could
#: store, but refused these objects (the series' own problem, not the PACS's availability).
_REACHED_KINDS = frozenset({FailureKind.STORE_STATUS, FailureKind.NO_CONTEXT})


@dataclass
class ExportOutcome:
    """Result of one attempt to deliver a series' objects to one destination.

    Attributes
    ----------
    ok : every object was stored.
    status : the remote DIMSE status of the first failure (``"0xA700"``; STOW-RS: the first
        Failure Reason, else the HTTP status, ``"HTTP 503"``) or None.
    error : human-readable failure (what the network or the PACS did), or None.
    stored : SOP Instance UIDs the destination accepted.
    kind : why the attempt failed, or None (success, or unknown).
    """

    ok: bool
    status: str | None = None
    error: str | None = None
    stored: list[str] = field(default_factory=list)
    kind: FailureKind | None = None

    @property
    def reached(self) -> bool:
        """The destination associated and could store (it is up, whatever these objects did).

        False for every network or association failure and for "out of resources"
        (C-STORE status A7xx: the PACS cannot store anything now).
        """
        if self.ok:
            return True
        if self.kind not in _REACHED_KINDS:
            return False
        return not (self.status or "").upper().startswith("0XA7")
