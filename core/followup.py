"""Following a patient over time: keyed patient hashes and the change between two studies.

A new study of a patient already measured (same Patient ID (0010,0020) and Issuer of
Patient ID (0010,0021)) is compared with the patient's latest measurement of an earlier
study date (issue 17). The job store keeps only an HMAC-SHA256 of the pair, keyed with a
site secret (``privacy.patient_key_file``): a stolen database without the key cannot be
matched to a patient list, and the Patient ID is never written to the database or a log.

Both processes use this module: the workers compute keys and changes, the web page reads
the stored trajectory (:meth:`core.jobs.JobStore.patient_measurements`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.config import Config

#: Name of the site secret in the spool when ``privacy.patient_key_file`` is not set.
PATIENT_KEY_FILE = "patient.key"
#: Bytes of a generated site secret (stored as hex).
PATIENT_KEY_BYTES = 32
#: Why an SMI change is absent when either study has no Patient Size.
SMI_CHANGE_ABSENT_NO_HEIGHT = "no skeletal muscle index (Patient Size missing) in "


def patient_key_path(config: Config) -> Path:
    """``privacy.patient_key_file``, else ``<node.spool_dir>/patient.key``."""
    return config.privacy.patient_key_file or config.node.spool_dir / PATIENT_KEY_FILE


def load_patient_secret(path: Path) -> bytes:
    """The site secret at ``path``, created (random, mode 0600) when the file is absent.

    Creation is atomic: the secret is written to a temporary file and linked to ``path``,
    which fails if another process created it meanwhile; that one's secret is then read.

    Parameters
    ----------
    path : the key file (hex text of at least 16 bytes).

    Returns
    -------
    bytes
        The secret.

    Raises
    ------
    ConfigError
        The file exists but does not hold a hex secret of at least 16 bytes.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(PATIENT_KEY_BYTES) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        raise ConfigError(f"privacy.patient_key_file {path}: not a hex secret") from exc
    if len(secret) < 16:
        raise ConfigError(f"privacy.patient_key_file {path}: secret shorter than 16 bytes")
    return secret


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str | None:
    """The keyed hash that stands for a patient in the job store.

    Parameters
    ----------
    secret : the site secret (:func:`load_patient_secret`).
    patient_id : Patient ID (0010,0020), surrounding spaces ignored.
    issuer : Issuer of Patient ID (0010,0021); "" when absent.

    Returns
    -------
    str or None
        64 hex digits of HMAC-SHA256(secret, JSON [issuer, patient_id]); None when the
        Patient ID is empty (such studies are not followed: they cannot be told apart).
    """
    pid = (patient_id or "").strip()
    if not pid:
        return None
    message = json.dumps([(issuer or "").strip(), pid], ensure_ascii=False).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def study_date_iso(dicom_date: str) -> str | None:
    """``"20260102"`` (DICOM DA) -> ``"2026-01-02"``; None when empty or not a date."""
    try:
        return dt.datetime.strptime((dicom_date or "").strip(), "%Y%m%d").date().isoformat()
    except ValueError:
        return None


@dataclass(frozen=True)
class MeasurementRow:
    """One measured series of a patient (a row of the ``measurements`` table).

    ``study_date`` is ISO (``YYYY-MM-DD``); areas in cm², SMI in cm²/m² (None without
    Patient Size); ``measured_at`` Unix seconds.
    """

    series_uid: str
    patient_key: str
    study_uid: str
    study_date: str
    sma_cm2: float
    smi_cm2_m2: float | None
    model_version: str
    measured_at: float = 0.0


@dataclass(frozen=True)
class MeasurementChange:
    """The change from a patient's previous measurement to the current one.

    Attributes
    ----------
    previous_date, current_date : ISO study dates.
    days : days between the two study dates (> 0).
    sma_cm2, sma_pct : SMA difference (current - previous), cm² and % of the previous.
    smi_cm2_m2, smi_pct : SMI difference, cm²/m² and %; None when either has no SMI.
    smi_absent_reason : why the SMI change is None (None when it is present).
    """

    previous_date: str
    current_date: str
    days: int
    sma_cm2: float
    sma_pct: float
    smi_cm2_m2: float | None
    smi_pct: float | None
    smi_absent_reason: str | None = None

    def text(self, unit_area: str = "cm2", unit_index: str = "cm2/m2") -> str:
        """One line for the SR and the SC, e.g. ``"Change since 2026-01-02 (120 days): SMA
        -12.3 cm2 (-8.1 %), SMI -4.02 cm2/m2 (-8.1 %)"``."""
        sma = f"SMA {self.sma_cm2:+.1f} {unit_area} ({self.sma_pct:+.1f} %)"
        if self.smi_cm2_m2 is not None and self.smi_pct is not None:
            smi = f"SMI {self.smi_cm2_m2:+.2f} {unit_index} ({self.smi_pct:+.1f} %)"
        else:
            smi = f"SMI change not computed: {self.smi_absent_reason}"
        return f"Change since {self.previous_date} ({self.days} days): {sma}, {smi}"


def _pct(delta: float, base: float) -> float:
    return 100.0 * delta / base if base else 0.0


def measurement_change(previous: MeasurementRow, current: MeasurementRow) -> MeasurementChange:
    """The change from ``previous`` to ``current`` (same patient, earlier study date).

    Parameters
    ----------
    previous, current : measurements with ISO study dates, ``previous`` strictly earlier.

    Returns
    -------
    MeasurementChange
        Differences rounded to what is measured: 0.1 cm², 0.01 cm²/m², 0.1 %.

    Raises
    ------
    ValueError
        ``previous`` is not earlier than ``current``.
    """
    d0 = dt.date.fromisoformat(previous.study_date)
    d1 = dt.date.fromisoformat(current.study_date)
    days = (d1 - d0).days
    if days <= 0:
        raise ValueError(f"previous study date {d0} is not before {d1}")
    sma = current.sma_cm2 - previous.sma_cm2
    smi = smi_pct = reason = None
    if previous.smi_cm2_m2 is not None and current.smi_cm2_m2 is not None:
        smi = round(current.smi_cm2_m2 - previous.smi_cm2_m2, 2)
        smi_pct = round(_pct(current.smi_cm2_m2 - previous.smi_cm2_m2, previous.smi_cm2_m2), 1)
    else:
        which = [
            n for n, r in (("previous", previous), ("current", current)) if r.smi_cm2_m2 is None
        ]
        reason = SMI_CHANGE_ABSENT_NO_HEIGHT + " and ".join(which) + " study"
    return MeasurementChange(
        previous_date=previous.study_date,
        current_date=current.study_date,
        days=days,
        sma_cm2=round(sma, 1),
        sma_pct=round(_pct(sma, previous.sma_cm2), 1),
        smi_cm2_m2=smi,
        smi_pct=smi_pct,
        smi_absent_reason=reason,
    )


class MeasurementStore(Protocol):
    """What :class:`PatientHistory` needs of :class:`core.jobs.JobStore` (which imports this
    module: a protocol, not an import, keeps the modules free of a cycle)."""

    def previous_measurement(
        self, patient_key: str, before_study_date: str
    ) -> MeasurementRow | None: ...

    def record_measurement(self, row: MeasurementRow) -> None: ...


@dataclass(frozen=True)
class PatientHistory:
    """Where a worker looks up and records a patient's measurements.

    Attributes
    ----------
    store : the job store (:class:`core.jobs.JobStore`; its ``measurements`` table).
    secret : the site secret of the patient hashes (:func:`load_patient_secret`).
    """

    store: MeasurementStore
    secret: bytes

    @classmethod
    def from_config(cls, config: Config, store: MeasurementStore) -> PatientHistory | None:
        """The history ``config`` asks for, or None when ``privacy.follow_patients`` is off.

        Raises
        ------
        ConfigError
            The key file exists but holds no usable secret.
        """
        if not config.privacy.follow_patients:
            return None
        return cls(store, load_patient_secret(patient_key_path(config)))
