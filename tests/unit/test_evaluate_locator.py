"""Tests of the locator evaluation (worker/evaluate.py) and the ``l3spot evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from research.evaluate_locator import CaseResult, summarise
from tests.conftest import require_shipped

MODELS = Path(__file__).resolve().parents[2] / "models"


def case(name: str, truth: int | None, pred: int | None, slice_mm: float = 2.0,
         refined: bool | None = None) -> CaseResult:  # fmt: skip
    tz = None if truth is None else truth * slice_mm
    pz = None if pred is None else pred * slice_mm
    return CaseResult(name, truth, tz, pred, pz, 0.9, slice_mm, 0.1, None, refined)


def test_summary_counts_errors_successes_and_field_of_view_decisions() -> None:
    res = [
        case("a", 100, 101, refined=True),  # 1 slice, 2 mm
        case("b", 100, 97, refined=True),  # 3 slices, 6 mm
        case("c", 50, 56, refined=False),  # 6 slices, 12 mm: beyond 10 mm
        case("d", 80, None),  # L3 missed (said not in FOV): a failure, no error figure
        case("e", None, None),  # chest: correct
        case("f", None, 30),  # pelvis called present: wrong
    ]
    s = summarise(res)
    assert s["n_cases"] == 6 and s["n_l3_in_fov"] == 4
    assert s["error_slices"]["mean"] == pytest.approx(10 / 3, abs=1e-3)
    assert s["error_slices"]["median"] == 3 and s["error_slices"]["max"] == 6
    assert s["error_mm"]["max"] == pytest.approx(12.0)
    assert s["within_10mm"] == "2/4" and s["within_10mm_share"] == 0.5
    assert s["missed_l3_said_not_in_fov"] == 1
    assert (s["not_in_fov_correct"], s["not_in_fov_incorrect"]) == (1, 1)
    assert s["refinement_applied"] == "2/3"
    assert summarise([case("x", 10, 10)])["refinement_applied"] is None


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_evaluate_command_prints_per_case_rows_and_the_overall_figures(tmp_path: Path) -> None:
    require_shipped(MODELS / "locator_cnn4.pt", "locator weights")
    from l3spot import app

    out = tmp_path / "eval.json"
    r = CliRunner().invoke(
        app,
        ["evaluate", "--phantoms", "2", "--seed", "2000010", "--device", "cpu", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [c["case"] for c in data["cases"]] == ["phantom-2000010", "phantom-2000011"]
    overall = data["overall"]
    assert overall["n_cases"] == 2 and overall["weights"].endswith(".pt")
    for c in data["cases"]:
        assert c["fov_ok"] == ((c["truth_slice"] is None) == (c["pred_slice"] is None))
        if c["err_mm"] is not None:
            assert c["err_mm"] >= 0 and c["err_slices"] >= 0
