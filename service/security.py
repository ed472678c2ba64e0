"""Who may associate, and how: peer checks, association limits and DICOM TLS.

The checks run when the peer's A-ASSOCIATE-RQ has arrived (pynetdicom ``EVT_REQUESTED``), so
a refused peer gets a proper A-ASSOCIATE-RJ (PS3.8 section 9.3.4, Table 9-21) rather than a
closed socket:

=====================================  ======  ==================  =============================
check                                  result  source              reason
=====================================  ======  ==================  =============================
calling AE title not allowed           1 perm  1 service-user      3 calling-AE-title-not-recog.
source address not allowed             1 perm  1 service-user      3 calling-AE-title-not-recog.
called AE title is not ``ae_title``    1 perm  1 service-user      7 called-AE-title-not-recog.
``node.max_associations`` reached      2 tran  3 provider (pres.)  2 local-limit-exceeded
free disk below ``min_free_disk_mb``   2 tran  3 provider (pres.)  1 temporary-congestion
=====================================  ======  ==================  =============================

PS3.8 identifies an application entity by its AE title *and* its presentation address, so
an address outside ``security.allowed_addresses`` is reported with the closest standard
reason, "calling AE title not recognized"; the log line and the audit record say
"address not allowed".
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.config import Config

# A-ASSOCIATE-RJ fields (PS3.8 Table 9-21).
RESULT_REJECTED_PERMANENT = 0x01
RESULT_REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_ACSE = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_NO_REASON = 0x01
REASON_CALLING_AE_NOT_RECOGNIZED = 0x03
REASON_CALLED_AE_NOT_RECOGNIZED = 0x07
REASON_TEMPORARY_CONGESTION = 0x01  # with SOURCE_PROVIDER_PRESENTATION
REASON_LOCAL_LIMIT_EXCEEDED = 0x02  # with SOURCE_PROVIDER_PRESENTATION

MIB = 1024 * 1024

#: Free bytes of the file system holding a path (injectable for tests).
FreeBytes = Callable[[Path], int]


def disk_free_bytes(path: Path) -> int:
    """Bytes available to this process on the file system holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class Rejection:
    """One A-ASSOCIATE-RJ: the three PS3.8 fields and a human reason for logs and audit."""

    result: int
    source: int
    diagnostic: int
    reason: str

    @property
    def transient(self) -> bool:
        """True for "rejected-transient" (the peer may retry later)."""
        return self.result == RESULT_REJECTED_TRANSIENT


class PeerPolicy:
    """Decides whether an association request is accepted.

    Parameters
    ----------
    config : ``node.ae_title``, ``node.max_associations``, ``node.min_free_disk_mb``,
        ``node.spool_dir`` and the ``security`` section.
    free_bytes : free-space function (default :func:`disk_free_bytes`); tests inject one.

    Raises
    ------
    ValueError
        An entry of ``security.allowed_addresses`` is not an IP address or CIDR network.
    """

    def __init__(self, config: Config, free_bytes: FreeBytes = disk_free_bytes) -> None:
        sec = config.security
        self.ae_title = config.node.ae_title.strip()
        self.allowed_calling = {t.strip() for t in sec.allowed_calling_ae_titles}
        self.networks = [
            ipaddress.ip_network(a.strip(), strict=False) for a in sec.allowed_addresses
        ]
        self.require_called = sec.require_called_ae_title
        self.max_associations = config.node.max_associations
        self.min_free_bytes = config.node.min_free_disk_mb * MIB
        self.spool_dir = Path(config.node.spool_dir)
        self.free_bytes = free_bytes

    def address_allowed(self, address: str) -> bool:
        """True when ``address`` lies in ``security.allowed_addresses`` (or that list is empty).

        IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``) are compared as IPv4.
        """
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def disk_ok(self, needed_bytes: int = 0) -> bool:
        """True when writing ``needed_bytes`` more keeps the spool above its free-disk floor."""
        if self.min_free_bytes <= 0:
            return True
        try:
            free = self.free_bytes(self.spool_dir)
        except OSError:
            return False
        return free - needed_bytes >= self.min_free_bytes

    def check(
        self, calling_ae: str, called_ae: str, address: str, active_associations: int
    ) -> Rejection | None:
        """The rejection for an association request, or None to accept it.

        Parameters
        ----------
        calling_ae, called_ae : AE titles from the A-ASSOCIATE-RQ (padding is ignored).
        address : the peer's IP address.
        active_associations : acceptor associations open now, this request included.
        """
        calling, called = calling_ae.strip(), called_ae.strip()
        if self.allowed_calling and calling not in self.allowed_calling:
            return Rejection(
                RESULT_REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLING_AE_NOT_RECOGNIZED,
                "calling AE title not allowed",
            )
        if not self.address_allowed(address):
            return Rejection(
                RESULT_REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLING_AE_NOT_RECOGNIZED,
                "address not allowed",
            )
        if self.require_called and called != self.ae_title:
            return Rejection(
                RESULT_REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLED_AE_NOT_RECOGNIZED,
                "called AE title not recognized",
            )
        if active_associations > self.max_associations:
            return Rejection(
                RESULT_REJECTED_TRANSIENT,
                SOURCE_PROVIDER_PRESENTATION,
                REASON_LOCAL_LIMIT_EXCEEDED,
                f"more than node.max_associations={self.max_associations} associations",
            )
        if not self.disk_ok():
            return Rejection(
                RESULT_REJECTED_TRANSIENT,
                SOURCE_PROVIDER_PRESENTATION,
                REASON_TEMPORARY_CONGESTION,
                "free disk below node.min_free_disk_mb",
            )
        return None


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do their handshake on first use.

    pynetdicom wraps accepted sockets in its listening thread; with the default
    ``do_handshake_on_connect=True`` one client that connects and stays silent would block
    every other connection. Deferred, the handshake runs in the association's own thread
    (on its first read) and a failure ends only that association.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):  # type: ignore[no-untyped-def,override]
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False, **kwargs
        )


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS context (DICOM TLS, PS3.15 Annex B.9 / B.1), or None when disabled.

    TLS 1.2 or later; with ``security.tls_require_client_certificate`` the client must
    present a certificate chaining to ``security.tls_ca_certificate`` (mutual TLS).

    Raises
    ------
    ValueError
        TLS is enabled without a certificate and key, or a client certificate is required
        without a CA to verify it.
    OSError, ssl.SSLError
        A certificate or key file cannot be read.
    """
    sec = config.security
    if not sec.tls_enabled:
        return None
    if sec.tls_certificate is None or sec.tls_private_key is None:
        raise ValueError("security.tls_enabled needs tls_certificate and tls_private_key")
    if sec.tls_require_client_certificate and sec.tls_ca_certificate is None:
        raise ValueError("security.tls_require_client_certificate needs tls_ca_certificate")
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(sec.tls_certificate), str(sec.tls_private_key))
    if sec.tls_ca_certificate is not None:
        ctx.load_verify_locations(str(sec.tls_ca_certificate))
    ctx.verify_mode = ssl.CERT_REQUIRED if sec.tls_require_client_certificate else ssl.CERT_NONE
    return ctx
