"""The confidence after the count (issue 15, calibrated confidence): P(within 10 mm) per
level-verification verdict, the file beside the verification weights, its fallback, how an
answer's confidence, flag and reason follow it, and the fit on evaluate-levels cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from core.config import LocatorConfig
from research.calibrate_levels import (
    build_level_calibration,
    case_verdict,
    level_probabilities,
    level_report,
    load_level_cases,
    read_level_cases,
)
from research.evaluate_levels import LevelCase
from tests.support.outputs import fabricated_location
from worker.locator.calibration import (
    LevelCalibration,
    calibration_path,
    file_sha256,
    load_level_calibration,
    verdict_of,
)
from worker.locator.locate import _calibrate_on_verdict


def _weights(tmp_path: Path) -> tuple[Path, Path, Path]:
    files = tmp_path / "locator.pt", tmp_path / "locator_fine.pt", tmp_path / "spine.pt"
    for f in files:
        f.write_bytes(f.name.encode())
    return files


def _level_cal(coarse: Path, fine: Path | None, spine: Path, flag: float = 0.8) -> LevelCalibration:
    return LevelCalibration(
        maps={
            "confirmed": ((0.0, 1.0), (0.95, 0.99)),
            "unverified": ((0.0, 0.5, 1.0), (0.3, 0.5, 0.9)),
            "corrected": ((0.0, 1.0), (0.7, 0.7)),
        },
        flag_below=flag,
        score="raw_x_fine_correlation2",
        coarse_sha256=file_sha256(coarse),
        fine_sha256=None if fine is None else file_sha256(fine),
        verify_sha256=file_sha256(spine),
    )


# -- the verdict ----------------------------------------------------------------------------


def test_the_verdict_is_the_status_and_whether_the_counts_disagree() -> None:
    assert verdict_of(None) is None and verdict_of({}) is None
    assert verdict_of({"status": "confirmed"}) == "confirmed"
    assert verdict_of({"status": "confirmed", "possible_transitional_anatomy": True}) == (
        "transitional_confirmed"
    )
    assert verdict_of({"status": "corrected", "applied": True}) == "corrected"
    assert verdict_of(
        {"status": "corrected", "applied": True, "possible_transitional_anatomy": True}
    ) == ("transitional_corrected")
    # verify_mode "flag": the locator's level stands against the count; never calibrated
    assert verdict_of({"status": "corrected", "applied": False}) is None
    assert verdict_of({"status": "unverified"}) == "unverified"
    assert verdict_of({"status": "counted"}) == "counted"
    assert verdict_of({"status": "something else"}) is None


# -- the map and its file -------------------------------------------------------------------


def test_level_calibration_maps_each_verdict_and_refuses_bad_maps(tmp_path: Path) -> None:
    coarse, fine, spine = _weights(tmp_path)
    cal = _level_cal(coarse, fine, spine)
    assert cal.probability("confirmed", 0.5, 1.0) == pytest.approx(0.97)
    # the score is the first stage's: raw x max(fine correlation, 0)^2
    assert cal.probability("unverified", 1.0, 0.5) == pytest.approx(0.4)
    assert cal.probability("counted", 0.9, None) is None  # no map: keep the first stage's
    assert cal.probability(None, 0.9, None) is None
    again = LevelCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.maps == cal.maps and again.verify_sha256 == cal.verify_sha256
    with pytest.raises(ValueError, match="unknown verdict"):
        LevelCalibration({"guessed": ((0.0,), (0.5,))}, 0.5, "confidence_raw", "a", None, "b")
    with pytest.raises(ValueError, match="non-decreasing"):
        LevelCalibration(
            {"confirmed": ((0.0, 1.0), (0.9, 0.5))}, 0.5, "confidence_raw", "a", None, "b"
        )
    with pytest.raises(ValueError, match="at least one"):
        LevelCalibration({}, 0.5, "confidence_raw", "a", None, "b")
    with pytest.raises(ValueError, match="not a l3spot-level-calibration"):
        LevelCalibration.from_dict({"format": "l3spot-locator-calibration"})


def test_level_calibration_loads_only_for_all_three_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coarse, fine, spine = _weights(tmp_path)
    caplog.set_level(logging.WARNING, logger="worker.locator.calibration")
    assert load_level_calibration(spine, coarse, fine) is None
    assert "no level calibration file" in caplog.text
    _level_cal(coarse, fine, spine).save(calibration_path(spine))
    assert calibration_path(spine) == tmp_path / "spine.calibration.json"
    loaded = load_level_calibration(spine, coarse, fine)
    assert loaded is not None and loaded.flag_below == 0.8
    caplog.clear()
    assert load_level_calibration(spine, coarse, None) is None  # fitted with a refinement
    assert "other weights" in caplog.text
    spine.write_bytes(b"retrained spine network")
    caplog.clear()
    assert load_level_calibration(spine, coarse, fine) is None
    assert "other weights" in caplog.text
    calibration_path(spine).write_text("[]")
    caplog.clear()
    assert load_level_calibration(spine, coarse, fine) is None
    assert "unreadable level calibration file" in caplog.text


# -- the answer -----------------------------------------------------------------------------


def _config(coarse: Path, fine: Path, spine: Path) -> LocatorConfig:
    return LocatorConfig(weights=coarse, refine_weights=fine, verify_weights=spine)


def _answer(status: str, confidence: float = 0.4, **verification: object):  # noqa: ANN202
    res = fabricated_location()
    res.confidence, res.confidence_raw, res.flag_below = confidence, 0.5, 0.5
    res.refinement = {"correlation": 1.0}
    res.reason = "low P(within 10 mm) (0.40 < 0.50); check the L3 slice"
    res.verification = {"status": status, "applied": True, **verification}
    return res


def test_a_confirmed_answer_reports_the_calibrated_probability_and_loses_the_low_reason(
    tmp_path: Path,
) -> None:
    coarse, fine, spine = _weights(tmp_path)
    _level_cal(coarse, fine, spine).save(calibration_path(spine))
    res = _answer("confirmed")
    assert res.low_confidence  # the first stage's 0.4 < 0.5
    _calibrate_on_verdict(res, _config(coarse, fine, spine))
    assert res.confidence == pytest.approx(0.97) and res.flag_below == 0.8
    assert res.verification["confidence_locator"] == pytest.approx(0.4)
    assert res.confidence_calibrated and not res.low_confidence and res.reason is None


def test_an_unchecked_answer_is_flagged_by_its_verdict_and_a_correction_keeps_its_reason(
    tmp_path: Path,
) -> None:
    coarse, fine, spine = _weights(tmp_path)
    _level_cal(coarse, fine, spine).save(calibration_path(spine))
    res = _answer("unverified", confidence=0.95)
    res.reason = None
    _calibrate_on_verdict(res, _config(coarse, fine, spine))
    assert res.confidence == pytest.approx(0.5) and res.low_confidence
    assert res.reason == "low P(within 10 mm) (0.50 < 0.80); check the L3 slice"
    corrected = _answer("corrected", confidence=0.95)
    corrected.reason = "L3 level corrected by counting vertebrae from the sacrum; check the level"
    _calibrate_on_verdict(corrected, _config(coarse, fine, spine))
    assert corrected.confidence == pytest.approx(0.7) and corrected.low_confidence
    assert corrected.reason.startswith("L3 level corrected")


def test_without_a_level_calibration_or_a_map_the_first_stage_confidence_stands(
    tmp_path: Path,
) -> None:
    coarse, fine, spine = _weights(tmp_path)
    res = _answer("confirmed")
    _calibrate_on_verdict(res, _config(coarse, fine, spine))  # no file
    assert (
        res.confidence == 0.4
        and res.flag_below == 0.5
        and "confidence_locator" not in (res.verification)
    )
    _level_cal(coarse, fine, spine).save(calibration_path(spine))
    counted = _answer("counted")  # no map for "counted"
    _calibrate_on_verdict(counted, _config(coarse, fine, spine))
    assert counted.confidence == 0.4 and counted.flag_below == 0.5
    cfg = _config(coarse, fine, spine).model_copy(update={"min_confidence": 0.99})
    res = _answer("confirmed")
    _calibrate_on_verdict(res, cfg)  # the site's own threshold wins over the calibration's
    assert res.flag_below == 0.99 and res.low_confidence


# -- the fit --------------------------------------------------------------------------------


def _case(name: str, status: str | None, error: float | None, raw: float, **kw) -> LevelCase:  # noqa: ANN003
    truth = 100.0
    return LevelCase(
        name=name,
        transitional=None,
        truth_z_mm=truth,
        l3_range_mm=(88.0, 112.0),
        in_fov_said=error is not None,
        locator_z_mm=None if error is None else truth + error,
        final_z_mm=None if error is None else truth + error,
        status=status,
        counted_by=None,
        flagged_transitional=kw.get("flagged", False),
        lumbar_counted=None,
        seconds_verify=0.1,
        countable=True,
        flags=kw.get("flags", ()),
        confidence=None if error is None else raw,
        confidence_raw=raw,
        fine_correlation=1.0,
    )


def _validation() -> list[LevelCase]:
    cases = [_case(f"b-{i}", "confirmed", 2.0, 0.3 + 0.01 * i) for i in range(40)]
    cases += [
        _case(f"b-{100 + i}", "unverified", 30.0 if i < 4 else 1.0, 0.2 + 0.1 * i) for i in range(8)
    ]
    cases += [_case("b-200", "confirmed", 3.0, 0.9, flagged=True)]
    cases += [_case("b-201", None, None, 0.1)]  # refused: not an answer
    return cases


def test_the_fit_maps_each_verdict_on_its_answers_and_the_flag_catches_the_unchecked(
    tmp_path: Path,
) -> None:
    coarse, fine, spine = _weights(tmp_path)
    shas = {
        "weights": file_sha256(coarse),
        "refine_weights": file_sha256(fine),
        "verify_weights": file_sha256(spine),
    }
    cal = build_level_calibration(_validation(), shas, {"command": "test"}, 0.15)
    assert set(cal.maps) == {"confirmed", "unverified", "transitional_confirmed"}
    # 40 right confirmed answers: one block, Laplace's 41/42
    assert cal.probability("confirmed", 0.5, 1.0) == pytest.approx(41 / 42)
    # the four unchecked answers with the lowest scores are the wrong ones
    assert cal.probability("unverified", 0.2, 1.0) == pytest.approx(1 / 6)
    assert cal.probability("unverified", 0.9, 1.0) == pytest.approx(5 / 6)
    rec = cal.record["validation"]
    assert rec["n"] == 49 and rec["n_wrong"] == 4
    assert rec["flag"]["recall"] == 1.0 and rec["flag"]["flagged"] == 4
    assert rec["per_verdict"]["unverified"] == {
        "answers": 8,
        "wrong": 4,
        "mean_probability": pytest.approx(0.5, abs=1e-3),
    }
    p = level_probabilities(cal, [c for c in _validation() if c.final_z_mm is not None])
    assert p.shape == (49,) and np.all((p >= 0) & (p <= 1))
    with pytest.raises(ValueError, match="name their"):
        build_level_calibration(_validation(), {"weights": "x"}, {}, 0.15)


def test_an_answer_without_mid_l3_counts_as_wrong_and_evaluations_keep_their_old_flags() -> None:
    cal = LevelCalibration(
        {"confirmed": ((0.0, 1.0), (0.9, 0.9))}, 0.5, "raw_x_fine_correlation2", "a", None, "b"
    )
    outside = _case("b-1", "confirmed", 5.0, 0.9, flags=("low_l3_confidence",))
    outside.truth_z_mm = None  # mid-L3 not in the scan, but an answer was given
    report = level_report(cal, [outside, _case("b-2", "confirmed", 1.0, 0.9)])
    assert report["n_wrong"] == 1 and report["flags_then"] == {
        "flagged": 1,
        "wrong_among_flagged": 1,
        "wrong_unflagged": 0,
    }
    # this calibration says 0.9 for both, above its 0.5: the wrong answer loses its flag
    assert report["flags_now"] == {"flagged": 0, "wrong_among_flagged": 0, "wrong_unflagged": 1}
    assert case_verdict(_case("b-3", None, 1.0, 0.9)) is None


def test_cases_come_from_evaluate_levels_files_of_one_set_of_weights(tmp_path: Path) -> None:
    shas = {"weights": "a", "refine_weights": None, "verify_weights": "b"}
    rows = [c.row() for c in _validation()]
    one, two, old = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "old.json"
    one.write_text(json.dumps({"summary": {}, "cases": rows[:20], "weights_sha256": shas}))
    two.write_text(json.dumps({"summary": {}, "cases": rows[20:], "weights_sha256": shas}))
    old.write_text(json.dumps({"summary": {}, "cases": rows}))
    cases, got = load_level_cases([one, two])
    assert len(cases) == len(rows) and got == shas
    assert cases[0] == _validation()[0]  # a row reads back as the case it was
    with pytest.raises(ValueError, match="names its weights"):
        read_level_cases(old)
    with pytest.raises(ValueError, match="more than one file"):
        load_level_cases([one, one])
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps({"cases": rows[:1], "weights_sha256": {**shas, "verify_weights": "c"}})
    )
    with pytest.raises(ValueError, match="other weights"):
        load_level_cases([one, other])


# -- the command ----------------------------------------------------------------------------


def _cases_file(path: Path, cases: list[LevelCase], shas: dict[str, str | None]) -> Path:
    path.write_text(
        json.dumps({"summary": {}, "cases": [c.row() for c in cases], "weights_sha256": shas})
    )
    return path


def test_calibrate_levels_writes_the_file_for_the_configured_weights_and_reports_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from l3spot import app

    coarse, fine, spine = _weights(tmp_path)
    monkeypatch.setenv("L3SPOT__LOCATOR__WEIGHTS", str(coarse))
    monkeypatch.setenv("L3SPOT__LOCATOR__REFINE_WEIGHTS", str(fine))
    monkeypatch.setenv("L3SPOT__LOCATOR__VERIFY_WEIGHTS", str(spine))
    shas = {
        "weights": file_sha256(coarse),
        "refine_weights": file_sha256(fine),
        "verify_weights": file_sha256(spine),
    }
    val = _cases_file(tmp_path / "val.json", _validation(), shas)
    test_cases = [_case(f"b-{900 + i}", "confirmed", 1.0, 0.5) for i in range(5)]
    test = _cases_file(tmp_path / "test.json", test_cases, shas)
    png = tmp_path / "rel.png"
    args = ["calibrate-levels", "--cases", str(val), "--test", str(test), "--png", str(png)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cal = load_level_calibration(spine, coarse, fine)
    assert cal is not None and cal.record["test"]["n"] == 5
    assert cal.record["validation_phantoms"] == ["b-0", "b-201", 50]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # cases of other weights, or test cases that are validation cases, are refused
    other = _cases_file(tmp_path / "other.json", _validation(), {**shas, "verify_weights": "x"})
    out = tmp_path / "never.json"
    r = CliRunner().invoke(app, ["calibrate-levels", "--cases", str(other), "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
    r = CliRunner().invoke(
        app, ["calibrate-levels", "--cases", str(val), "--test", str(val), "--out", str(out)]
    )
    assert r.exit_code == 2 and not out.exists()


# -- the shipped level calibration ----------------------------------------------------------


def test_the_shipped_level_calibration_applies_to_the_shipped_weights() -> None:
    """Fitted on style-B validation cases of the shipped networks, reported on other seeds,
    for every verdict the validation saw: a retrained network without a new calibration
    fails here, not silently in production (where it falls back with a warning)."""
    from tests.conftest import require_shipped

    cfg = LocatorConfig()
    path = require_shipped(calibration_path(cfg.verify_weights), "level calibration")
    cal = load_level_calibration(cfg.verify_weights, cfg.weights, cfg.refine_weights)
    assert cal is not None, f"{path} was not fitted with the shipped weights: calibrate-levels"
    rec = cal.record
    assert rec["command"].startswith("l3spot calibrate-levels") and rec["git_commit"]
    assert rec["validation_phantoms"][0].startswith("b-") and rec["test"]["n"] > 100
    first, last = (int(n.split("-")[1]) for n in rec["validation_phantoms"][:2])
    t_first, t_last = (int(n.split("-")[1]) for n in rec["test_phantoms"][:2])
    assert t_first > last or t_last < first  # test seeds apart from the fitted ones
    assert {"confirmed", "corrected", "counted", "unverified"} <= set(cal.maps)
    assert 0.0 < cal.flag_below < 1.0
