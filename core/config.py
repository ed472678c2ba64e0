"""One typed configuration model for the node and the workers.

Loaded from ``config.yaml`` (path from ``--config`` or the ``L3SPOT_CONFIG`` environment
variable), then overridden by environment variables named ``L3SPOT__<SECTION>__<KEY>``
(for example ``L3SPOT__NODE__PORT=11113`` or ``L3SPOT__BROKER__URL=redis://redis:6379/0``).
Every key is documented in ``docs/configuration.md``.

The model lives in :mod:`worker` because both the node (``service``) and the workers read it,
and data flows from ``service`` to ``worker``, never back.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from core.composition_params import LEGACY_FLAT_KEYS, ClassicalParams
from core.errors import ConfigError

__all__ = [
    "AnyDestination",
    "Config",
    "ConfigError",
    "DicomwebDestination",
    "Destination",
    "load_config",
]

ENV_CONFIG_PATH = "L3SPOT_CONFIG"
ENV_PREFIX = "L3SPOT__"

#: Root folder of the real test data (``../shared/data`` beside the repository by default).
ENV_DATA_DIR = "L3SPOT_DATA"

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeConfig(_Section):
    """The DICOM node (C-STORE/C-ECHO SCP) and its spool."""

    ae_title: str = Field("L3SPOT", max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    spool_dir: Path = Path("./var/spool")
    quarantine_dir: Path | None = None  # default: <spool_dir>/../quarantine
    results_dir: Path | None = None  # default: <spool_dir>/../results
    series_stable_seconds: float = Field(30.0, ge=0)
    watcher_interval_seconds: float = Field(1.0, gt=0)
    min_slices: int = Field(20, ge=1)
    series_description_regex: str | None = None
    max_associations: int = Field(10, ge=1)
    # connections whose A-ASSOCIATE-RQ has not arrived yet are not associations
    # (service/gate.py): their own caps, and the ARTIM time (PS3.8 9.1.5) within which the
    # TLS handshake and the whole request must arrive
    max_pending_connections: int = Field(64, ge=1)
    max_pending_per_address: int = Field(8, ge=1)
    artim_timeout_seconds: float = Field(10.0, gt=0)
    # largest instance accepted (MiB); a larger one is answered 0xA700 (service/receive.py)
    max_instance_mb: int = Field(2048, ge=1)
    # a data set larger than this (MiB) goes to a file under the spool as it arrives
    spill_to_disk_mb: int = Field(16, ge=1)
    # a Deflated data set (PS3.5 A.5) may inflate to at most this (MiB): zip bombs
    max_inflated_mb: int = Field(64, ge=1)
    max_pdu_bytes: int = Field(65536, ge=0)  # 0 = unlimited (pynetdicom)
    min_free_disk_mb: int = Field(1024, ge=0)
    max_series_instances: int = Field(5000, ge=1)
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    fsync: bool = True  # fsync each instance and its folder before answering 0x0000

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, v: str) -> str:
        v = v.strip()
        if not v or "\\" in v or any(ord(c) < 32 for c in v):
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return v

    def resolved_quarantine_dir(self) -> Path:
        return self.quarantine_dir or self.spool_dir.parent / "quarantine"

    def resolved_results_dir(self) -> Path:
        return self.results_dir or self.spool_dir.parent / "results"


class SecurityConfig(_Section):
    """Who may associate, and DICOM TLS (PS3.15 Annex B.9)."""

    allowed_calling_ae_titles: list[str] = Field(default_factory=list)  # empty = any
    allowed_addresses: list[str] = Field(default_factory=list)  # IPs or CIDRs; empty = any
    require_called_ae_title: bool = True
    tls_enabled: bool = False
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificate: Path | None = None
    tls_require_client_certificate: bool = True


class BrokerConfig(_Section):
    """Celery broker. ``url: null`` = the embedded default (no Redis, no Docker)."""

    url: str | None = None
    result_backend: str | None = None
    embedded_polling_interval_seconds: float = 0.05
    worker_concurrency: int = Field(1, ge=1)
    embedded_dir: Path | None = None  # default: <spool_dir>/../broker
    serve_starts_workers: bool | None = None  # default: only with the embedded broker
    worker_pool: Literal["prefork", "solo", "threads"] = "prefork"
    # redis: a task not acknowledged this long after delivery (its worker died) is delivered
    # again; must exceed the longest analysis and export backoff (Celery "visibility timeout")
    visibility_timeout_seconds: int = Field(3600, ge=1)
    # a running analysis writes a heartbeat into its job record this often
    heartbeat_seconds: float = Field(10.0, gt=0)
    # the node's reconciliation: every reconcile_interval_seconds (0 = off) series whose job
    # record did not move for longer than these are sent to the queue again (lost task)
    reconcile_interval_seconds: float = Field(30.0, ge=0)
    stale_queued_seconds: float = Field(900.0, gt=0)  # queued, no worker picked it up
    stale_running_seconds: float = Field(120.0, gt=0)  # analysing/exporting, no heartbeat
    # redis: socket timeout (s) so that a publish on a dead connection fails instead of hanging
    socket_timeout_seconds: float = Field(10.0, gt=0)

    def resolved_embedded_dir(self, node: NodeConfig) -> Path:
        return self.embedded_dir or node.spool_dir.parent / "broker"

    def starts_workers(self) -> bool:
        return self.url is None if self.serve_starts_workers is None else self.serve_starts_workers


#: Broker URL schemes whose unacknowledged messages come back after a visibility timeout
#: (kombu's Redis and SQS transports): a Celery ETA (retry countdown) must be shorter.
VISIBILITY_TIMEOUT_SCHEMES = frozenset({"redis", "rediss", "sqs"})


class Destination(_Section):
    """A C-STORE SCP (the PACS) that receives the SEG, SR and SC (``kind: dimse``, the default)."""

    kind: Literal["dimse"] = "dimse"  # DIMSE C-STORE (PS3.4 Annex B); old entries have no kind
    ae_title: str = Field(..., max_length=16)
    host: str
    port: int = Field(..., ge=1, le=65535)

    @property
    def label(self) -> str:
        """``AE@host:port``, the key of a destination in the job records."""
        return f"{self.ae_title}@{self.host}:{self.port}"


#: Host names that only reach this machine: a DICOMweb destination there may use plain HTTP.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``::1`` and 127.0.0.0/8 (a connection that never leaves the host)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DicomwebDestination(_Section):
    """A DICOMweb origin server that receives the results by STOW-RS (PS3.18 10.5).

    The secret (a bearer token, or the password of HTTP basic authentication) is never in
    the configuration file: it is read from the environment variable ``secret_env`` or the
    file ``secret_file`` each time a request is made (a rotated token file is picked up
    without a restart). Plain ``http://`` is refused unless the host is this machine
    (loopback) or ``allow_insecure_http`` says that the network between is trusted.
    """

    kind: Literal["dicomweb"]
    # base URL of the DICOMweb service (STOW-RS posts to <url>/studies, QIDO-RS probes
    # <url>/studies?limit=1), e.g. https://pacs.example.org/dicom-web; no user:password@,
    # no query
    url: str
    auth: Literal["none", "bearer", "basic"] = "none"  # HTTP Authorization scheme (RFC 6750/7617)
    username: str | None = None  # basic: the user name (not secret)
    secret_env: str | None = None  # name of the environment variable holding the secret
    secret_file: Path | None = None  # or: a file holding it (trailing newline stripped)
    tls_verify: bool = True  # verify the server's certificate and host name (https)
    tls_ca_certificate: Path | None = None  # CA bundle to verify it with; null = system CAs
    # plain http to a host other than this machine (results and the secret unencrypted)
    allow_insecure_http: bool = False
    # connect and read timeout of one request (s); null = export.timeout_seconds
    timeout_seconds: float | None = Field(None, gt=0)

    @field_validator("url")
    @classmethod
    def _url_valid(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/path, not {v!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "url must not carry user:password@ (it would be logged and shown as the "
                "destination's label); use auth with secret_env or secret_file"
            )
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or a fragment (the service's base URL)")
        if ":" in parts.hostname:
            # dicomweb-client 0.61 parses the host with [^/:]+ and sends "Host: [" for it
            raise ValueError("url: an IPv6 address is not supported here; use a host name")
        return v

    @model_validator(mode="after")
    def _auth_and_transport(self) -> DicomwebDestination:
        host = urlsplit(self.url).hostname or ""
        if self.url.startswith("http://") and not (
            is_loopback_host(host) or self.allow_insecure_http
        ):
            raise ValueError(
                f"{self.url}: plain http sends the results (patient data) and any secret "
                "unencrypted; use https, or set allow_insecure_http: true for a trusted "
                "network segment"
            )
        if self.auth == "none":
            if self.secret_env or self.secret_file or self.username:
                raise ValueError("username, secret_env and secret_file need auth: bearer|basic")
            return self
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError(f"auth: {self.auth} needs exactly one of secret_env, secret_file")
        if self.auth == "basic" and not self.username:
            raise ValueError("auth: basic needs username")
        if self.auth == "bearer" and self.username:
            raise ValueError("username is for auth: basic only")
        return self

    @property
    def label(self) -> str:
        """The base URL (never with credentials), the key of a destination in the job records."""
        return self.url


def _destination_kind(value: Any) -> str:
    """The discriminator of a destination: ``kind``, ``dimse`` when absent (old files)."""
    if isinstance(value, dict):
        return str(value.get("kind", "dimse"))
    return str(getattr(value, "kind", "dimse"))


#: One export destination: a C-STORE SCP or a DICOMweb STOW-RS service.
AnyDestination = Destination | DicomwebDestination

_DestinationField = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


class ExportConfig(_Section):
    """Sending the results back (C-STORE SCU or DICOMweb STOW-RS), retried until the PACS
    answers again.

    A failed delivery to a destination is retried after ``backoff_initial_seconds``,
    doubling up to ``backoff_max_seconds`` (5, 10, 20 ... 640, then every 900 s), for
    ``retry_for_hours`` after its first failure (a PACS maintenance window; mercure waits
    5 x 900 s), and only then ``failed``. docs/reliability.md "Export that waits for the PACS".
    """

    destinations: list[_DestinationField] = Field(default_factory=list)
    calling_ae_title: str | None = None  # default: node.ae_title
    # hours a destination's delivery keeps being retried after its first failed attempt
    retry_for_hours: float = Field(24.0, gt=0)
    # optional cap on the attempts per destination (old configurations: 5); null = the
    # window above alone decides. Whichever ends first ends the delivery.
    max_attempts: int | None = Field(None, ge=1)
    backoff_initial_seconds: float = Field(5.0, ge=0)
    # cap of the wait between attempts (s); below broker.visibility_timeout_seconds (Redis
    # would deliver a waiting retry again otherwise)
    backoff_max_seconds: float = Field(900.0, ge=0)
    timeout_seconds: float = Field(30.0, gt=0)  # connect/ACSE/DIMSE/network timeout (s)
    # an eligible CT series whose analysis fails still gets an SR and an SC in its study that
    # say "not measured" and why, so the reader can tell "failed" from "not run"
    report_not_measured: bool = True
    # after a reader's correction, also send an IHE IOCM rejection note (Key Object Selection
    # "Rejected for Quality Reasons") of the SEG, SR and SC it superseded, so that a PACS with
    # IOCM hides them (docs/review.md "The corrected objects in the PACS")
    reject_superseded: bool = True


class FhirConfig(_Section):
    """The measurements as a FHIR R4 Observation (worker/outputs/fhir.py, docs/outputs.md).

    The Observation is always written beside ``result.json`` when body composition was
    measured; sending it is off by default. A failed POST is logged, never fails the analysis.
    """

    # POST each Observation to ``url`` after the analysis (RESTful create, no retries)
    enabled: bool = False
    # base URL of the FHIR R4 server (the resource goes to <url>/Observation), http or https
    url: str | None = Field(None, pattern=r"^https?://")
    # connect and read timeout of the POST (s)
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _url_when_enabled(self) -> FhirConfig:
        if self.enabled and not self.url:
            raise ValueError("fhir.enabled needs fhir.url (the FHIR server's base URL)")
        return self


#: Keys that were removed from the ``locator`` section, and why (an old file that still has
#: one fails with this message instead of pydantic's bare "extra inputs are not permitted").
REMOVED_LOCATOR_KEYS = {
    "mip_pixel_mm": (
        "locator.mip_pixel_mm was removed: the MIP pixel size comes from the locator weights "
        "(the window geometry saved with the model, 3 mm for the first stage and 1 mm for the "
        "refinement stage of the shipped models); delete the key"
    ),
}


class LocatorConfig(_Section):
    """L3 localisation (Belharbi et al. 2017).

    The MIP pixel size and the window geometry are not settings: they belong to the trained
    model and are read from its weights file (``WindowSpec`` in :mod:`worker.locator.windows`).
    """

    weights: Path = MODELS_DIR / "locator_cnn4_round3.pt"  # first stage (locator_cnn4.md)
    stride_px: int = Field(4, ge=1)  # step between first-stage windows (MIP rows)
    batch_size: int = Field(64, ge=1)
    # low_l3_confidence flag below this reported confidence; null = the threshold chosen
    # with the locator's calibration (models/locator_cnn4.md), 0.5 on the raw score without one
    min_confidence: float | None = Field(None, ge=0, le=1)
    # second, finer stage around the first answer (worker/locator/fine.py, models/
    # locator_fine_cnn4.md); null = first stage only
    refine_weights: Path | None = MODELS_DIR / "locator_fine_cnn4.pt"
    refine_stride_px: int = Field(2, ge=1)  # step between fine window centres (fine MIP rows)
    # models the site trained from its readers' corrections ('l3spot train --from-reviews',
    # docs/learning.md): the promoted version replaces weights/refine_weights above; null =
    # <node.spool_dir>/../models. use_site_models: false = always the configured weights
    site_models_dir: Path | None = None
    use_site_models: bool = True
    # level verification (worker/locator/vertebrae.py, models/spine_fcn.md): count the
    # vertebrae around the located L3 from the ribs and from the sacrum; null = off.
    # verify_mode "correct": a counted L3 elsewhere replaces the locator's slice (QA flag
    # l3_level_corrected); "flag": the slice is kept and l3_level_disagrees is raised
    verify_weights: Path | None = MODELS_DIR / "spine_fcn.pt"
    verify_mode: Literal["correct", "flag"] = "correct"
    # when the locator says "not in the field of view", count the vertebrae over the scan
    # and answer the L3 a radiologist could count to (QA flags l3_found_by_counting and
    # low_l3_confidence): a lumbar-spine window or a scan without the lower ribs. On by
    # default since 2026-12-07, chosen on the style-B validation phantoms
    # (models/spine_fcn.md, "Changes of 2026-12-07"); false = the refusal stands
    count_when_absent: bool = True

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, why in REMOVED_LOCATOR_KEYS.items():
                if key in data:
                    raise ValueError(why)
        return data


class CompositionConfig(_Section):
    """Body composition at L3 (Mitsiopoulos et al. 1998 HU ranges)."""

    method: Literal["classical", "unet"] = "classical"
    unet_weights: Path = MODELS_DIR / "seg_unet.pt"
    muscle_hu: tuple[float, float] = (-29.0, 150.0)  # Mitsiopoulos et al. 1998
    fat_hu: tuple[float, float] = (-190.0, -30.0)  # Mitsiopoulos et al. 1998
    neighbour_mm: float = Field(0.0, ge=0)  # average over L3 +/- this many mm
    sarcopenia_cutoffs: Literal["prado2008", "martin2013"] = "prado2008"
    # classical segmentation: every threshold, its unit and source (core/composition_params.py)
    classical: ClassicalParams = Field(default_factory=ClassicalParams)
    # QA flags
    metal_hu: float = 2000.0
    metal_min_area_mm2: float = Field(30.0, ge=0)
    muscle_mean_hu_qa: tuple[float, float] = (-20.0, 80.0)
    # U-Net (seed "Abdominal musculature segmentation and surface prediction from CT")
    unet_pixel_mm: float = Field(1.0, gt=0)
    unet_hu_window: tuple[float, float] = (-150.0, 300.0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_flat_keys(cls, data: Any) -> Any:
        """Classical keys written flat (``composition.skin_mm``) move into ``classical``."""
        if isinstance(data, dict) and LEGACY_FLAT_KEYS & data.keys():
            data = dict(data)
            classical = data.get("classical")
            if isinstance(classical, BaseModel):
                classical = classical.model_dump()
            moved = dict(classical or {})
            for key in LEGACY_FLAT_KEYS & data.keys():
                moved.setdefault(key, data.pop(key))
            data["classical"] = moved
        return data


class AnalysisConfig(_Section):
    """Where the computation runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = None
    # a series whose analysis started this many times without finishing (its worker process
    # died each time: out of memory, a crash in a native library) is failed, not re-run
    max_attempts: int = Field(3, ge=1)


class WebConfig(_Section):
    """The operators' web page."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str | None = None
    show_patient_identifiers: bool = False
    # Host header names the page answers to, besides the loopback names (localhost,
    # 127.0.0.1, ::1) and web.host when it is one address (not 0.0.0.0/::); any port. A
    # leading dot matches subdomains (".example.org"); "*" turns the check off (DNS
    # rebinding defence, docs/web.md)
    allowed_hosts: list[str] = Field(default_factory=list)
    # /readyz and the destinations page: a destination's C-ECHO result is reused this long
    destination_echo_interval_seconds: float = Field(30.0, gt=0)
    # ACSE/DIMSE/network timeout of those C-ECHOs and of the page's C-ECHO test button
    destination_echo_timeout_seconds: float = Field(5.0, gt=0)
    # review (issue 17): slices the job page's viewer shows on each side of the L3 slice
    review_slices_around_l3: int = Field(15, ge=1, le=200)
    # review: the Verifying Organization of a corrected, verified SR (PS3.3 C.17.2.1)
    review_organisation: str = Field("l3spot", min_length=1, max_length=64)
    # who is who on the page (issue 17, docs/web.md "Users and roles"): "token" = only
    # web.token (no token: open, loopback only); "users" = HTTP Basic with a named user of
    # `l3spot users add`; "proxy" = the user named by a trusted reverse proxy's header.
    # web.token, when set, is accepted in every mode (automation, administrator rights)
    auth: Literal["token", "users", "proxy"] = "token"
    # proxy mode: the request header holding the signed-in user's name
    proxy_user_header: str = "X-Remote-User"
    # proxy mode: a header listing the user's groups or roles (comma separated), mapped to a
    # role by proxy_roles; None: the role comes from the users table (`l3spot users add`)
    # or proxy_default_role
    proxy_role_header: str | None = None
    # proxy mode: group (value of proxy_role_header) -> role; the highest role wins
    proxy_roles: dict[str, Literal["reader", "administrator"]] = Field(
        default_factory=lambda: {"reader": "reader", "administrator": "administrator"}
    )
    # proxy mode: the role of a signed-in user no group or users-table entry names; None:
    # such a user is refused (403)
    proxy_default_role: Literal["reader", "administrator"] | None = None
    # proxy mode: addresses (CIDR) of the reverse proxies whose headers are believed; the
    # user header from any other peer is refused (403). Required in proxy mode
    trusted_proxies: list[str] = Field(default_factory=list)
    # failed sign-ins (docs/web.md "Failed sign-ins"): after login_max_failures wrong
    # passwords for one user name from one address within login_window_seconds, that
    # address's further attempts for that name get 429 (Retry-After) without a password check
    # until the window has passed; login_max_failures_per_address wrong passwords from one
    # address, whatever the names, throttle the address. Never an account lock-out: the right
    # password from another address is always checked
    login_max_failures: int = Field(5, ge=1, le=1000)
    login_max_failures_per_address: int = Field(20, ge=1, le=10000)
    login_window_seconds: float = Field(300.0, gt=0, le=86400)
    # most (address, user name) pairs and addresses remembered (least recently failed first
    # out): bounds the memory an attacker with many addresses can make the node use
    login_tracked_max: int = Field(10000, ge=16, le=1_000_000)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_lower(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v if h.strip()]

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError as exc:
                raise ValueError(f"web.trusted_proxies: {item!r} is not an address/CIDR") from exc
        return out


class PrivacyConfig(_Section):
    """Following a patient over time without storing the Patient ID (issue 17)."""

    # compare a new study with the patient's previous measurement (same Patient ID and
    # Issuer of Patient ID); the job store keeps HMAC-SHA256 keyed hashes, never the ID
    follow_patients: bool = True
    # the site secret of those hashes (32 random bytes, hex); created 0600 on first use when
    # absent. None: <node.spool_dir>/patient.key. Shared by every worker of the site
    patient_key_file: Path | None = None


class RetentionConfig(_Section):
    """Deleting what the node no longer needs (issue 16; like Orthanc's MaximumStorageSize
    and mercure's retention). Only series with nothing left to do are deleted: a job in
    ``done``, ``failed`` or ``ineligible`` whose every export is ``done``, oldest first; never
    one being received, queued, analysed or exported, or with an export pending or failed."""

    enabled: bool = True  # the node runs retention every interval_minutes
    interval_minutes: float = Field(60.0, gt=0)  # between two runs in the node (min)
    # a series' CT in the spool is deleted this long after its job's last activity (days);
    # null = never by age
    spool_max_age_days: float | None = Field(30.0, gt=0)
    # its results folder (SEG, SR, SC, overview, result.json) likewise (days); null = never
    results_max_age_days: float | None = Field(365.0, gt=0)
    # quarantined inputs (refused instances, stray series) likewise (days); null = never
    quarantine_max_age_days: float | None = Field(90.0, gt=0)
    # high watermark (GiB) of spool + results + quarantine; above it the oldest deletable
    # series go until low_watermark_fraction x this is left; null = no size limit
    max_storage_gb: float | None = Field(None, gt=0)
    # free-disk watermark (GiB) of the spool's file system; below it the oldest deletable
    # series go until this / low_watermark_fraction is free; null = off. Keep it well above
    # node.min_free_disk_mb, the floor at which the node refuses scanners
    min_free_disk_gb: float | None = Field(5.0, gt=0)
    # hysteresis of both watermarks: delete down to this fraction (0-1), not just below
    low_watermark_fraction: float = Field(0.8, gt=0, lt=1)


class LoggingConfig(_Section):
    """Logs: one JSON object per line on stdout for ``serve`` and ``worker`` (core/logs.py)."""

    level: str = "INFO"
    json_logs: bool = True
    audit_log: Path | None = None  # default: <spool_dir>/../audit.log
    # the node C-ECHOes each export destination once at start, from a background thread, and
    # logs one destination_echo line each; ACSE/DIMSE/network timeout (s) of that C-ECHO,
    # 0 = no C-ECHO at start
    startup_echo_timeout_seconds: float = Field(5.0, ge=0)


class JobsConfig(_Section):
    """Where the job records live (core/jobs.py, docs/deployment.md "Several hosts").

    ``database_url: null`` keeps them in SQLite inside the spool (one host). Nodes and
    workers on several hosts sharing the spool (NFS) need PostgreSQL: SQLite's locks are not
    safe over a network file system. The password is never in the URL of the configuration
    file: ``password_env`` or ``password_file`` (read at start-up), or libpq's own
    ``PGPASSWORD``/``~/.pgpass``.
    """

    # null = SQLite at <spool_dir>/jobs.sqlite; or postgresql+psycopg://user@host[:port]/db
    # (postgresql:// means the same; ?sslmode=require etc. pass to libpq)
    database_url: str | None = None
    password_env: str | None = None  # name of the environment variable holding the password
    password_file: Path | None = None  # or: a file holding it (trailing newline stripped)

    @field_validator("database_url")
    @classmethod
    def _postgresql_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgresql+psycopg://")):
            # the value is not repeated: it may hold a password
            raise ValueError("must be null (SQLite in the spool) or postgresql+psycopg://...")
        return v

    @model_validator(mode="after")
    def _one_password_source(self) -> JobsConfig:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        if self.database_url is None and (self.password_env or self.password_file):
            raise ValueError("password_env/password_file need database_url")
        return self

    def password(self) -> str | None:
        """The database password from ``password_env`` or ``password_file``; None if neither.

        Raises
        ------
        ConfigError
            The variable is not set, or the file cannot be read (neither is shown).
        """
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"jobs.password_env: {self.password_env} is not set")
            return value
        if self.password_file is not None:
            try:
                return self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"jobs.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from exc
        return None


class Config(_Section):
    """The whole configuration of a node and its workers."""

    node: NodeConfig = Field(default_factory=NodeConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    locator: LocatorConfig = Field(default_factory=LocatorConfig)
    composition: CompositionConfig = Field(default_factory=CompositionConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    fhir: FhirConfig = Field(default_factory=FhirConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)

    @model_validator(mode="after")
    def _retry_below_visibility_timeout(self) -> Config:
        """An export retry must fire before Redis takes its held message as lost."""
        url = self.broker.url or ""
        vt = self.broker.visibility_timeout_seconds
        if url.split(":", 1)[0] in VISIBILITY_TIMEOUT_SCHEMES and (
            self.export.backoff_max_seconds >= vt
        ):
            raise ValueError(
                f"export.backoff_max_seconds ({self.export.backoff_max_seconds:g} s) must be "
                f"below broker.visibility_timeout_seconds ({vt} s): the broker would deliver "
                "a waiting export retry a second time"
            )
        return self

    def resolved_site_models_dir(self) -> Path:
        """Where the site's locator versions live: ``locator.site_models_dir``, else
        ``<node.spool_dir>/../models`` (beside the results, shared by the site's workers)."""
        return self.locator.site_models_dir or self.node.spool_dir.parent / "models"

    def export_calling_ae_title(self) -> str:
        """Our AE title towards the destinations: ``export.calling_ae_title``, else
        ``node.ae_title`` (C-STORE of the results and C-ECHO of the destinations alike)."""
        return self.export.calling_ae_title or self.node.ae_title


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Nested dict from ``L3SPOT__SECTION__KEY=value`` variables; values parsed as YAML."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _config_path(path: str | Path | None, environ: dict[str, str]) -> Path:
    return Path(path or environ.get(ENV_CONFIG_PATH) or "config.yaml")


def config_file(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Path | None:
    """The file :func:`load_config` reads for these arguments, absolute; None when none exists
    (the built-in defaults and the environment only)."""
    cfg_path = _config_path(path, dict(os.environ if environ is None else environ))
    return cfg_path.resolve() if cfg_path.is_file() else None


def _one_line(exc: ValidationError) -> str:
    """``key.path: message; ...`` for each error, on one line, without the values (which may
    be secrets such as a token or a broker password)."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{key}: {' '.join(msg.split())}")
    return "; ".join(parts)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load the configuration.

    Parameters
    ----------
    path : YAML file; default ``$L3SPOT_CONFIG``, else ``config.yaml`` in the working
        directory if present, else the built-in defaults.
    environ : environment to read overrides from (default ``os.environ``).

    Raises
    ------
    ConfigError
        The file is missing (when named explicitly), not YAML, or a value is invalid.
    """
    environ = dict(os.environ if environ is None else environ)
    explicit = path is not None or ENV_CONFIG_PATH in environ
    cfg_path = _config_path(path, environ)
    data: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            data = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{cfg_path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_path}: top level must be a mapping")
    elif explicit:
        raise ConfigError(f"configuration file not found: {cfg_path}")
    data = _merge(data, _env_overrides(environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration ({cfg_path}): {_one_line(exc)}") from exc
    except Exception as exc:  # a validator's own error type, should pydantic not wrap it
        text = " ".join(str(exc).split())
        raise ConfigError(f"invalid configuration ({cfg_path}): {text}") from exc


def data_dir() -> Path:
    """Root of the shared real CT data (``$L3SPOT_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get(ENV_DATA_DIR) or REPO_ROOT.parent / "shared" / "data")
