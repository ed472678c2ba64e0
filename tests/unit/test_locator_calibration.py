"""The locator's calibrated confidence (issue 15): the monotone map, the flag threshold,
the file beside the weights and its fallback, what result.json and the flag report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import LocatorConfig
from core.result import l3_result
from research.calibrate_locator import (
    CalibrationCase,
    build_calibration,
    choose_threshold,
    fit_isotonic,
    flag_stats,
    reliability_table,
)
from research.commands import TRAINING_SEEDS
from tests.conftest import require_shipped
from tests.support.outputs import fabricated_location
from worker.locator.calibration import (
    Calibration,
    calibration_path,
    file_sha256,
    load_calibration,
)
from worker.locator.locate import RAW_FLAG_THRESHOLD, flag_threshold, locate_in_mip


def _cal(knots_raw, knots_p, flag=0.5, coarse="a", fine=None) -> Calibration:  # noqa: ANN001
    return Calibration(tuple(knots_raw), tuple(knots_p), flag, coarse, fine)


# -- the map --------------------------------------------------------------------------------


def test_isotonic_fit_pools_violators_into_a_non_decreasing_map() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    kx, ky = fit_isotonic(x, y)
    assert np.all(np.diff(ky) >= 0) and np.all(np.diff(kx) > 0)
    # PAV by hand: (0) | (1, 0) -> 0.5 | (1, 1, 0) -> 2/3; knots at each block's ends
    assert kx.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.6])
    assert ky.tolist() == pytest.approx([0.0, 0.5, 0.5, 2 / 3, 2 / 3])
    # Laplace: (0+1)/(1+2), (1+1)/(2+2), (2+1)/(3+2), still non-decreasing
    _, ly = fit_isotonic(x, y, laplace=True)
    assert ly.tolist() == pytest.approx([1 / 3, 0.5, 0.5, 0.6, 0.6])


def test_isotonic_fit_merges_equal_blocks_and_never_reports_certainty_with_laplace() -> None:
    x = np.linspace(0.5, 1.0, 100)
    kx, ky = fit_isotonic(x, np.ones(100), laplace=True)
    assert kx.tolist() == [0.5, 1.0] and ky.tolist() == pytest.approx([101 / 102] * 2)


def test_isotonic_fit_pools_equal_scores_and_sorts() -> None:
    kx, ky = fit_isotonic(np.array([0.9, 0.2, 0.9, 0.2]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert kx.tolist() == pytest.approx([0.2, 0.9]) and ky.tolist() == pytest.approx([0.5, 0.5])
    # 0.2 -> 1 then 0.9 -> 0.5 violate the order: one block of 2/3
    kx, ky = fit_isotonic(np.array([0.9, 0.2, 0.9]), np.array([1.0, 1.0, 0.0]))
    assert kx.tolist() == pytest.approx([0.2, 0.9]) and ky.tolist() == pytest.approx([2 / 3] * 2)
    with pytest.raises(ValueError):
        fit_isotonic(np.zeros(0), np.zeros(0))


def test_calibration_interpolates_and_refuses_a_decreasing_map() -> None:
    cal = _cal([0.2, 0.8], [0.4, 1.0])
    assert cal.probability(0.5) == pytest.approx(0.7)
    assert cal.probability(0.0) == pytest.approx(0.4) and cal.probability(1.0) == 1.0
    with pytest.raises(ValueError):
        _cal([0.2, 0.8], [0.9, 0.4])
    with pytest.raises(ValueError):
        _cal([0.8, 0.2], [0.4, 0.9])
    with pytest.raises(ValueError):
        _cal([0.2], [1.2])


# -- the threshold --------------------------------------------------------------------------


def test_threshold_flags_the_wrong_answers_within_the_allowed_share() -> None:
    p = np.array([0.2, 0.3, 0.6] + [0.97] * 17)
    ok = np.array([False, False, True] + [True] * 16 + [False])
    t = choose_threshold(p, ok, max_flagged_share=0.10)
    stats = flag_stats(p, ok, t)
    # flagging below 0.3+ catches both low wrong answers, flags 2/20 = 10 %, precision 1
    assert 0.3 < t <= 0.6
    assert stats["flagged"] == 2 and stats["precision"] == 1.0
    assert stats["recall"] == pytest.approx(2 / 3, abs=1e-3) and stats["flagged_share"] == 0.1
    # a tighter share flags fewer
    assert flag_stats(p, ok, choose_threshold(p, ok, 0.05))["flagged"] == 1


def test_threshold_is_zero_when_no_answer_is_wrong() -> None:
    p = np.array([0.5, 0.9, 0.99])
    assert choose_threshold(p, np.ones(3, bool)) == 0.0
    assert flag_stats(p, np.ones(3, bool), 0.0)["flagged"] == 0


def test_reliability_table_bins_predictions() -> None:
    p = np.array([0.1, 0.15, 0.92, 0.97, 1.0])
    ok = np.array([False, True, True, True, True])
    rows = reliability_table(p, ok, edges=(0, 0.5, 0.95, 1.0))
    assert [r["n"] for r in rows] == [2, 1, 2]
    assert rows[0]["observed"] == 0.5 and rows[2]["bin"] == "[0.95, 1]"


def test_build_calibration_fits_answers_only_and_records_the_weights(tmp_path: Path) -> None:
    w = tmp_path / "coarse.pt"
    w.write_bytes(b"first stage")

    def case(seed: int, raw: float, err: float | None, answered: bool = True) -> CalibrationCase:
        return CalibrationCase(
            seed, err is not None, answered, err, 3.0, raw, 0.9, 0.9, 0.9, None, None
        )

    cases = [case(i, 0.9, 2.0) for i in range(18)] + [
        case(100, 0.1, 30.0),
        case(101, 0.2, 25.0),
        case(102, 0.0, None, answered=False),  # "not in FOV": no answer, left out
    ]
    cfg = LocatorConfig(weights=w, refine_weights=None)
    cal = build_calibration(cases, cfg, {"command": "test"}, max_flagged_share=0.2)
    assert cal.coarse_sha256 == file_sha256(w) and cal.fine_sha256 is None
    # Laplace-smoothed block shares: 19/20 right, 1/4 for the two wrong ones
    assert cal.probability(0.9) == pytest.approx(19 / 20) and cal.probability(0.1) == 0.25
    assert cal.score == "confidence_raw"  # no refinement: both scores tie, the simpler wins
    assert 0.0 < cal.flag_below <= 1.0
    assert cal.record["n_validation_answers"] == 20 and cal.record["command"] == "test"
    assert cal.record["validation_flag"]["precision"] == 1.0


# -- the file beside the weights, and its fallback ------------------------------------------


def test_calibration_file_sits_beside_the_first_stage_weights() -> None:
    assert calibration_path(Path("models/locator_cnn4_round3.pt")) == Path(
        "models/locator_cnn4_round3.calibration.json"
    )
    assert calibration_path(Path("v/site-0001/locator.pt")).name == "locator.calibration.json"


def test_calibration_loads_for_its_weights_and_falls_back_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coarse, fine = tmp_path / "locator.pt", tmp_path / "locator_fine.pt"
    coarse.write_bytes(b"coarse")
    fine.write_bytes(b"fine")
    caplog.set_level(logging.WARNING, logger="worker.locator.calibration")
    assert load_calibration(coarse, fine) is None
    assert "no calibration file" in caplog.text and "raw confidence" in caplog.text

    cal = _cal([0.1, 0.9], [0.3, 0.98], 0.6, file_sha256(coarse), file_sha256(fine))
    cal.save(calibration_path(coarse))
    loaded = load_calibration(coarse, fine)
    assert loaded is not None and loaded.flag_below == 0.6
    assert loaded.probability(0.9) == pytest.approx(0.98)

    caplog.clear()
    assert load_calibration(coarse, None) is None  # fitted with a refinement stage
    assert "other locator weights" in caplog.text
    coarse.write_bytes(b"retrained")  # the weights changed, the calibration did not
    caplog.clear()
    assert load_calibration(coarse, fine) is None
    assert "other locator weights" in caplog.text

    calibration_path(coarse).write_text("{not json")
    caplog.clear()
    assert load_calibration(coarse, fine) is None
    assert "unreadable calibration file" in caplog.text


def test_the_score_of_the_refinement_enters_only_where_it_ran() -> None:
    from worker.locator.calibration import calibration_score

    assert calibration_score("confidence_raw", 0.8, 0.5) == 0.8
    assert calibration_score("raw_x_fine_correlation2", 0.8, 0.5) == pytest.approx(0.2)
    assert calibration_score("raw_x_fine_correlation2", 0.8, -0.3) == 0.0
    assert calibration_score("raw_x_fine_correlation2", 0.8, None) == 0.8
    with pytest.raises(ValueError):
        calibration_score("presence", 0.8, None)
    cal = Calibration((0.0, 1.0), (0.0, 1.0), 0.5, "a", None, score="raw_x_fine_correlation2")
    assert cal.probability(0.8, 0.5) == pytest.approx(0.2)
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_the_flag_threshold_comes_from_config_then_calibration_then_the_raw_default() -> None:
    cal = _cal([0.1, 0.9], [0.3, 0.98], 0.7)
    assert flag_threshold(0.4, cal) == 0.4
    assert flag_threshold(None, cal) == 0.7
    assert flag_threshold(None, None) == RAW_FLAG_THRESHOLD == 0.5


# -- the shipped calibration ----------------------------------------------------------------


def test_the_shipped_calibration_applies_to_the_shipped_weights() -> None:
    cfg = LocatorConfig()
    path = require_shipped(calibration_path(cfg.weights), "locator calibration")
    cal = load_calibration(cfg.weights, cfg.refine_weights)
    assert cal is not None, f"{path} was not fitted with the shipped weights: recalibrate"
    rec = cal.record
    val, test = range(*rec["validation_seeds"]), range(*rec["test_seeds"])
    assert val.start >= TRAINING_SEEDS.stop and test.start >= TRAINING_SEEDS.stop
    assert not set(range(val.start, val.stop + 1)) & set(range(test.start, test.stop + 1))
    assert rec["git_commit"] and rec["command"].startswith("l3spot calibrate-locator")
    assert np.all(np.diff(cal.knots_probability) >= 0)


# -- inference: the reported confidence and the flag -----------------------------------------


@pytest.fixture(scope="module")
def phantom_run() -> tuple:
    from worker.locator.weights import load_locator
    from worker.training.locator import phantom_mips

    cfg = LocatorConfig()
    coarse = load_locator(require_shipped(cfg.weights), "cpu")
    fine = load_locator(require_shipped(cfg.refine_weights), "cpu")
    mips, z = phantom_mips(2_000_002, (coarse.spec.pixel_mm, fine.spec.pixel_mm), False)
    assert z is not None
    return mips, coarse, fine


def _locate(phantom_run: tuple, cal: Calibration | None, min_conf: float | None = None):  # noqa: ANN202
    mips, coarse, fine = phantom_run
    return locate_in_mip(mips[0], coarse, 4, 64, min_conf, (mips[1], fine), 2, calibration=cal)


def test_confidence_is_the_calibrated_probability_and_the_flag_follows_it(
    phantom_run: tuple,
) -> None:
    raw = _locate(phantom_run, None)
    assert raw.in_field_of_view and not raw.confidence_calibrated
    assert raw.confidence == raw.confidence_raw and raw.flag_below == RAW_FLAG_THRESHOLD
    # a map that puts every raw score at 0.9: reported 0.9, raw kept
    flat = _cal([0.0, 1.0], [0.9, 0.9], flag=0.95)
    res = _locate(phantom_run, flat)
    assert res.confidence == pytest.approx(0.9) and res.confidence_calibrated
    assert res.confidence_raw == pytest.approx(raw.confidence_raw)
    assert res.slice_index == raw.slice_index  # calibration never moves the answer
    assert res.low_confidence and "P(within 10 mm)" in (res.reason or "")
    res = _locate(phantom_run, _cal([0.0, 1.0], [0.9, 0.9], flag=0.5))
    assert not res.low_confidence and res.reason is None
    # locator.min_confidence, when set, overrides the calibration's threshold
    assert _locate(phantom_run, flat, min_conf=0.5).low_confidence is False
    summary = res.summary()
    assert summary["confidence_raw"] == pytest.approx(raw.confidence_raw, abs=1e-4)
    assert summary["confidence_calibrated"] is True and summary["flag_below"] == 0.5
    assert set(summary["confidence_parts"]) == {"correlation", "agreement", "presence"}


def test_result_json_keeps_the_raw_confidence_and_the_threshold() -> None:
    loc = fabricated_location()
    l3 = json.loads(l3_result(loc, "1.2.3").model_dump_json())
    assert l3["confidence"] == pytest.approx(0.87) and l3["confidence_raw"] == pytest.approx(0.61)
    assert l3["confidence_calibrated"] is True and l3["confidence_flag_below"] == 0.5


def test_a_missing_calibration_file_leaves_the_locator_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.locator.locate import load_stages

    cfg = LocatorConfig()
    w = tmp_path / "locator.pt"
    shutil.copy(require_shipped(cfg.weights), w)
    caplog.set_level(logging.WARNING, logger="worker.locator.calibration")
    stages = load_stages(cfg.model_copy(update={"weights": w}), "cpu")
    assert stages.calibration is None and "not calibrated" in caplog.text


def test_auc_ranks_the_right_answers_above_the_wrong_ones() -> None:
    from research.calibrate_locator import auc

    ok = np.array([True, True, False])
    assert auc(np.array([0.9, 0.8, 0.1]), ok) == 1.0
    assert auc(np.array([0.1, 0.8, 0.9]), ok) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5]), ok) == 0.5
    assert auc(np.array([0.5, 0.5]), np.array([True, True])) is None


@pytest.mark.parametrize(
    "args",
    [
        ["--val-seed", "100"],  # inside the training seeds
        ["--val-seed", "5000000", "--test-seed", "5000050"],  # validation and test overlap
    ],
)
def test_calibrate_locator_refuses_training_or_overlapping_seeds(
    args: list[str], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from l3spot import app

    out = tmp_path / "cal.json"
    r = CliRunner().invoke(app, ["calibrate-locator", *args, "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
