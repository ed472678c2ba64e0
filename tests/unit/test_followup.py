"""Following a patient: keyed hashes, the change between studies, the measurements history.

The store tests run on both back-ends (SQLite, and PostgreSQL when a server answers; the
``backend`` fixture of tests/unit/test_jobs.py).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.followup import (
    MeasurementRow,
    load_patient_secret,
    measurement_change,
    patient_key,
    study_date_iso,
)
from tests.unit.test_jobs import Backend, backend  # noqa: F401 (fixture)

PATIENT_ID = "PAT-0042-CLEARTEXT"


def _row(series: str, date: str, sma: float, smi: float | None, key: str = "k") -> MeasurementRow:
    return MeasurementRow(
        series_uid=series,
        patient_key=key,
        study_uid=f"{series}.0",
        study_date=date,
        sma_cm2=sma,
        smi_cm2_m2=smi,
        model_version="locator-v1",
    )


def test_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "patient.key"
    first = load_patient_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_patient_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["patient.key"]  # no temporary left


def test_a_file_that_is_not_a_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "patient.key"
    path.write_text("not hex")
    with pytest.raises(ConfigError, match="patient_key_file"):
        load_patient_secret(path)


def test_keyed_hash_is_stable_with_the_key_and_differs_between_keys_and_issuers() -> None:
    a, b = b"a" * 32, b"b" * 32
    assert patient_key(a, PATIENT_ID, "HOSP") == patient_key(a, f" {PATIENT_ID} ", "HOSP")
    assert patient_key(a, PATIENT_ID, "HOSP") != patient_key(b, PATIENT_ID, "HOSP")
    assert patient_key(a, PATIENT_ID, "HOSP") != patient_key(a, PATIENT_ID, "OTHER")
    key = patient_key(a, PATIENT_ID)
    assert key is not None and len(key) == 64 and PATIENT_ID not in key
    assert patient_key(a, "  ") is None  # no ID: not followed


def test_study_date_iso() -> None:
    assert study_date_iso("20260102") == "2026-01-02"
    assert study_date_iso("") is None and study_date_iso("2026-01-02") is None


def test_change_in_days_cm2_and_percent() -> None:
    ch = measurement_change(
        _row("1", "2026-01-01", 150.0, 50.0), _row("2", "2026-05-01", 138.0, 46.0)
    )
    assert ch.days == 120
    assert (ch.sma_cm2, ch.sma_pct) == (-12.0, -8.0)
    assert (ch.smi_cm2_m2, ch.smi_pct, ch.smi_absent_reason) == (-4.0, -8.0, None)
    assert ch.text() == (
        "Change since 2026-01-01 (120 days): SMA -12.0 cm2 (-8.0 %), SMI -4.00 cm2/m2 (-8.0 %)"
    )


def test_missing_height_leaves_the_smi_change_out_with_a_reason() -> None:
    ch = measurement_change(
        _row("1", "2026-01-01", 150.0, None), _row("2", "2026-01-31", 153.0, 51.0)
    )
    assert ch.days == 30 and ch.sma_pct == 2.0
    assert ch.smi_cm2_m2 is None and ch.smi_pct is None
    assert ch.smi_absent_reason is not None and "previous" in ch.smi_absent_reason
    assert "SMI change not computed" in ch.text()


def test_previous_must_be_earlier() -> None:
    with pytest.raises(ValueError):
        measurement_change(_row("1", "2026-01-02", 1, 1), _row("2", "2026-01-02", 1, 1))


def test_history_finds_the_latest_earlier_study_of_the_same_patient(
    backend: Backend,  # noqa: F811
) -> None:
    store = backend.store()
    store.record_measurement(_row("s1", "2025-01-01", 140.0, 48.0))
    store.record_measurement(_row("s2", "2025-06-01", 135.0, 46.0))
    store.record_measurement(_row("s3", "2025-09-01", 120.0, 40.0, key="other"))
    store.record_measurement(_row("s4", "2026-01-01", 130.0, 44.0))
    prev = store.previous_measurement("k", "2026-01-01")
    assert prev is not None and prev.series_uid == "s2"
    assert store.previous_measurement("k", "2025-01-01") is None
    assert [m.series_uid for m in store.patient_measurements("k")] == ["s1", "s2", "s4"]
    # a re-analysis of a series replaces its row
    store.record_measurement(_row("s2", "2025-06-01", 136.0, None))
    again = backend.store().measurement("s2")
    assert again is not None and (again.sma_cm2, again.smi_cm2_m2) == (136.0, None)


def test_the_clear_patient_id_never_reaches_the_database(tmp_path: Path) -> None:
    backend_ = Backend(tmp_path, None)
    key = patient_key(load_patient_secret(tmp_path / "patient.key"), PATIENT_ID, "HOSP")
    assert key is not None
    backend_.store().record_measurement(_row("s1", "2025-01-01", 140.0, 48.0, key=key))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite*"))
    assert key.encode() in raw  # the hash is there (the file was written) ...
    assert PATIENT_ID.encode() not in raw  # ... the ID is not
