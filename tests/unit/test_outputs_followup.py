"""The change since the patient's previous study in the SR (dciodvfy clean) and the SC."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from core.followup import MeasurementChange
from tests.support.outputs import (
    L3_INDEX,
    ct_dataset,
    fabricated_composition,
    fabricated_location,
    synthetic_hu,
    synthetic_labels,
)
from tests.unit.test_outputs_sr import _dciodvfy_problems
from worker.outputs import codes as c
from worker.outputs import render
from worker.outputs.seg import build_seg
from worker.outputs.sr import build_sr, report_evaluations

CHANGE = MeasurementChange("2026-01-01", "2026-05-01", 120, -12.3, -8.1, -4.02, -8.1)
NO_SMI = MeasurementChange(
    "2026-01-01", "2026-05-01", 120, -12.3, -8.1, None, None, "no height in previous study"
)


def _sr(tmp: Path, change: MeasurementChange) -> Path:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    seg = build_seg(ct, labels)
    sr = build_sr(ct, fabricated_location(), fabricated_composition(labels), seg, change=change)
    sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
    return tmp / "sr.dcm"


def _numbers(ds: pydicom.Dataset) -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            out[item.ConceptNameCodeSequence[0].CodeValue] = (
                float(mv.NumericValue),
                mv.MeasurementUnitsCodeSequence[0].CodeValue,
            )
        out.update(_numbers(item))
    return out


@pytest.mark.parametrize("change", [CHANGE, NO_SMI], ids=["with_smi", "without_smi"])
def test_sr_carries_the_change_and_passes_dciodvfy(
    change: MeasurementChange, tmp_path: Path
) -> None:
    path = _sr(tmp_path, change)
    errors, warnings = _dciodvfy_problems(path)
    assert errors == [] and warnings == [], errors + warnings
    ds = pydicom.dcmread(path)
    assert (c.CHANGE_SUMMARY.value, change.text()) in report_evaluations(ds)
    nums = _numbers(ds)
    assert nums[c.SMA_CHANGE.value] == (-12.3, "cm2")
    assert nums[c.SMA_CHANGE_PCT.value] == (-8.1, "%")
    assert nums[c.DAYS_SINCE_PREVIOUS.value] == (120.0, "d")
    if change.smi_cm2_m2 is None:
        assert c.SMI_CHANGE.value not in nums
        assert "SMI change not computed: no height" in change.text()
    else:
        assert nums[c.SMI_CHANGE.value] == (-4.02, "cm2/m2")


def test_sr_without_a_previous_study_has_no_change(tmp_path: Path) -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    sr = build_sr(ct, fabricated_location(), fabricated_composition(labels), build_seg(ct, labels))
    assert report_evaluations(sr) == []
    assert c.SMA_CHANGE.value not in _numbers(sr)


def test_sc_text_panel_prints_the_change() -> None:
    labels = synthetic_labels()
    rows = render._text_lines(
        fabricated_location(), fabricated_composition(labels), (), None, CHANGE
    )
    texts = [r[0] for r in rows if isinstance(r[0], str)]
    assert any(t.startswith("Change since 2026-01-01 (120 days): SMA -12.3 cm") for t in texts)
    without = render._text_lines(fabricated_location(), fabricated_composition(labels), (), None)
    assert not any(isinstance(r[0], str) and "Change since" in r[0] for r in without)
