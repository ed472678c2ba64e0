"""The before/after figures of the whole locator with the level verification
(research/evaluate_levels.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from research.evaluate_levels import (
    TRANSITIONAL_FOVS,
    TRANSITIONAL_VARIANTS,
    LevelCase,
    format_levels,
    paired,
    phantom_volumes,
    summarise,
    transitional_spec,
)
from research.phantom_b import at_pixel_size, generate_truth, validation_spec
from worker.training.locator import count_ends_in_z


def _case(
    name,
    truth,
    before,
    after,
    status,
    transitional=None,
    flagged=False,
    countable=None,
    flags=(),
    ends=None,
) -> LevelCase:
    return LevelCase(
        name=name,
        transitional=transitional,
        truth_z_mm=truth,
        l3_range_mm=None if truth is None else (truth - 12.0, truth + 12.0),
        in_fov_said=after is not None,
        locator_z_mm=before,
        final_z_mm=after,
        status=status,
        counted_by="ribs" if status else None,
        flagged_transitional=flagged,
        lumbar_counted=None,
        seconds_verify=0.2,
        countable=countable,
        flags=flags,
        ends_in_view=ends,
    )


def test_summary_counts_what_the_verification_fixed_and_broke() -> None:
    cases = [
        _case("fixed", 100.0, 135.0, 101.0, "corrected"),
        _case("kept", 100.0, 102.0, 102.0, "confirmed"),
        _case("broken", 100.0, 103.0, 140.0, "corrected"),
        _case("transitional", 100.0, 100.0, 100.0, "confirmed", "lumbarisation", True),
        _case("absent", None, None, None, None),
        _case("missed", 100.0, None, None, None),
        _case("counted", 100.0, None, 104.0, "counted"),
    ]
    s = summarise(cases)
    assert s["scans"] == 7 and s["l3_in_fov_and_answered"] == 5
    assert s["l3_in_fov_said_not"] == 1
    assert s["within_10mm_before"].startswith("3/5")
    assert s["within_10mm_after"].startswith("4/5")
    assert s["verdicts"] == {"confirmed": 2, "corrected": 2, "unverified": 0, "counted": 1}
    assert s["corrections_right"].startswith("1/2")
    assert s["corrections_that_broke_a_right_answer"] == 1
    assert s["transitional_flagged"].startswith("1/1")
    assert s["typical_flagged_transitional"].startswith("0/4")
    table = format_levels("test", s)
    assert "within 10mm after | 4/5" in table
    assert s["found_by_counting_right"].startswith("1/1")


def test_summary_gives_the_mean_error_in_each_scans_slices() -> None:
    """The issue's "mean <= 1 slice": 5 mm off at 1 mm slices and 3 mm off at 3 mm slices
    is (5 + 1) / 2 = 3 slices; a case without its slice spacing (older files) is left out."""
    thin = replace(_case("thin", 100.0, 105.0, 105.0, "confirmed"), slice_mm=1.0)
    thick = replace(_case("thick", 100.0, 97.0, 97.0, "confirmed"), slice_mm=3.0)
    old = _case("old", 100.0, 130.0, 130.0, "confirmed")
    s = summarise([thin, thick, old])
    assert s["mean_error_slices_after"] == pytest.approx(3.0)
    assert s["mean_error_mm_after"] == pytest.approx(38.0 / 3, abs=0.01)
    assert summarise([old])["mean_error_slices_after"] is None


def test_summary_counts_slices_answered_in_scans_without_l3() -> None:
    """Repro: a chest scan given an L3 by counting was in no figure (the error needs a
    truth); it is wrong whatever its z, and unflagged it would be a silent wrong answer."""
    cases = [
        _case("chest, counted", None, None, 40.0, "counted", flags=("l3_found_by_counting",)),
        _case("pelvis, answered", None, -286.0, -286.0, "confirmed"),
        _case("chest, refused", None, None, None, None),
        _case("abdomen", 100.0, 101.0, 101.0, "confirmed"),
    ]
    s = summarise(cases)
    assert s["l3_absent_answered"].startswith("2/3")
    assert s["l3_absent_answered_unflagged"].startswith("1/2")
    assert summarise(cases[2:])["l3_absent_answered"].startswith("0/1")


def test_summary_separates_right_refusals_from_misses_where_l3_can_be_counted() -> None:
    """The issue's "in the field of view": a radiologist can count to L3. A "not in field of
    view" where they could is a miss in the main figure; where they could not, a right
    refusal."""
    cases = [
        _case("right", 100.0, 102.0, 102.0, "confirmed", countable=True),
        _case("wrong", 100.0, 140.0, 140.0, "confirmed", countable=True),
        _case("missed", 100.0, None, None, None, countable=True),
        _case("refused", 100.0, None, None, None, countable=False),
        _case("uncountable but right", 100.0, 101.0, 101.0, "unverified", countable=False),
        _case("absent", None, None, None, None, countable=False),
    ]
    s = summarise(cases)
    assert s["l3_countable"] == 3
    assert s["l3_countable_said_not"] == 1 and s["l3_uncountable_said_not"] == 1
    assert s["l3_in_fov_said_not"] == 2
    assert s["within_10mm_of_countable"].startswith("1/3")
    assert s["within_10mm_after"].startswith("2/3")


def test_summary_counts_silent_wrong_answers() -> None:
    """Clinical safety: a wrong answer (over 10 mm) with no QA flag is silent; the share of
    flagged answers and how many of them are wrong say what a flag is worth."""
    cases = [
        _case("silent", 100.0, 140.0, 140.0, "confirmed"),
        _case("flagged wrong", 100.0, 140.0, 140.0, "confirmed", flags=("low_l3_confidence",)),
        _case("flagged right", 100.0, 130.0, 101.0, "corrected", flags=("l3_level_corrected",)),
        _case("right", 100.0, 101.0, 101.0, "confirmed"),
        _case("refused", 100.0, None, None, None),
    ]
    s = summarise(cases)
    assert s["wrong_and_unflagged"].startswith("1/4")
    assert s["answers_flagged"].startswith("2/4")
    assert s["flagged_that_are_wrong"].startswith("1/2")


def test_transitional_figures_where_both_ends_are_in_view_and_by_variant() -> None:
    """Transitional anatomy can be seen by counting only where the lower ribs and the sacrum
    are both in view: the summary gives the flags over those scans and per variant."""
    cases = [
        _case("seen, flagged", 100.0, 140.0, 100.0, "corrected", "6_lumbar", True, ends="both"),
        _case("seen, missed", 100.0, 140.0, 140.0, "confirmed", "6_lumbar", ends="both"),
        _case("seen, right", 100.0, 101.0, 101.0, "confirmed", "4_lumbar", ends="both"),
        _case("one end, wrong", 100.0, 140.0, 140.0, "counted", "4_lumbar", ends="sacrum"),
        _case("typical", 100.0, 101.0, 101.0, "confirmed", ends="both"),
    ]
    s = summarise(cases)
    assert s["transitional_flagged"].startswith("1/4")
    assert s["transitional_right_or_flagged"].startswith("2/4")
    assert s["transitional_both_ends_flagged"].startswith("1/3")
    assert s["transitional_both_ends_right_or_flagged"].startswith("2/3")
    assert s["transitional_by_variant"] == {
        "4_lumbar": "flagged 0/2 = 0.0 %, right or flagged 1/2 = 50.0 %",
        "6_lumbar": "flagged 1/2 = 50.0 %, right or flagged 1/2 = 50.0 %",
    }


def test_count_ends_need_the_last_rib_bearing_vertebra_or_the_top_of_the_sacrum() -> None:
    v = {"T12": (200.0, 220.0), "L1": (170.0, 195.0), "L3": (110.0, 135.0), "S1": (0.0, 30.0)}
    assert count_ends_in_z(v, -10.0, 240.0) == (True, True)
    assert count_ends_in_z(v, 60.0, 240.0) == (True, False)  # no sacrum
    assert count_ends_in_z(v, -10.0, 190.0) == (False, True)  # T12's middle above the scan
    assert count_ends_in_z(v, 60.0, 190.0) == (False, False)


def test_style_bt_draws_each_transitional_variant_in_scans_of_both_ends() -> None:
    seeds = range(7_500_000, 7_500_024)
    truths = [generate_truth(s, transitional_spec(s)) for s in seeds]
    drawn = {(t.variants["n_rib_pairs"], t.variants["n_lumbar"]) for t in truths}
    assert drawn == set(TRANSITIONAL_VARIANTS)
    assert all(t.variants["transitional"] for t in truths)
    assert {t.fov for t in truths} == set(TRANSITIONAL_FOVS)
    assert all(t.l3_in_fov for t in truths)


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        next(phantom_volumes("c", range(1)))


def test_style_b_at_another_pixel_size_keeps_the_field_of_view_and_the_patient() -> None:
    """``evaluate-levels --pixel-mm``: style B's validation spec draws 2.5 mm pixels, which
    scanners never use for an abdomen; at 1.25 mm the same seed is the same patient in the
    same field of view."""
    seed = 7_000_213
    spec = validation_spec(seed)
    fine = at_pixel_size(spec, 1.25)
    assert spec.pixel_mm == 2.5 and fine.pixel_mm == 1.25
    assert fine.size * fine.pixel_mm == pytest.approx(spec.size * spec.pixel_mm, abs=1.25)
    a, b = generate_truth(seed, spec), generate_truth(seed, fine)
    assert a.vertebrae_z_mm == b.vertebrae_z_mm and a.l3_mid_z_mm == b.l3_mid_z_mm
    with pytest.raises(ValueError, match="positive"):
        at_pixel_size(spec, 0.0)
    with pytest.raises(ValueError, match="pixel size"):
        next(phantom_volumes("a", range(1), pixel_mm=1.0))


@pytest.mark.slow  # one style-B volume at 1.25 mm pixels: a few seconds
def test_phantom_volumes_render_style_b_at_the_pixel_size_asked() -> None:
    ((_, coarse, t0),) = phantom_volumes("b", range(7_000_213, 7_000_214))
    ((_, fine, t1),) = phantom_volumes("b", range(7_000_213, 7_000_214), pixel_mm=1.25)
    assert coarse.pixel_spacing_mm == (2.5, 2.5) and fine.pixel_spacing_mm == (1.25, 1.25)
    assert fine.hu.shape[0] == coarse.hu.shape[0]  # the same slices
    assert fine.hu.shape[1] == pytest.approx(2 * coarse.hu.shape[1], abs=1)
    assert t0 == t1  # the same truth


def test_paired_comparison_counts_the_scans_where_two_networks_differ() -> None:
    """Two level networks on the same phantoms: only the discordant scans tell them apart
    (McNemar); scans without L3 or without an answer are left out."""
    first = [
        _case("a", 100.0, 100.0, 101.0, "confirmed"),
        _case("b", 100.0, 135.0, 101.0, "corrected"),
        _case("c", 100.0, 135.0, 135.0, "confirmed"),
        _case("d", None, None, None, None),
    ] + [_case(f"w{i}", 100.0, 100.0, 101.0, "confirmed") for i in range(8)]
    second = [
        _case("a", 100.0, 100.0, 101.0, "confirmed"),
        _case("b", 100.0, 135.0, 135.0, "confirmed"),
        _case("c", 100.0, 135.0, 135.0, "confirmed"),
        _case("d", None, None, None, None),
    ] + [_case(f"w{i}", 100.0, 100.0, 140.0, "corrected") for i in range(8)]
    p = paired(first, second)
    assert p["scans"] == 11 and p["both_right"] == 1 and p["neither_right"] == 1
    assert p["only_first"] == ["b"] + [f"w{i}" for i in range(8)] and p["only_second"] == []
    assert p["mcnemar_p"] == pytest.approx(2 * 0.5**9, abs=1e-4)  # 9 to 0
    assert paired(first, first)["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="same phantoms"):
        paired(first, second[::-1])


@pytest.mark.slow
def test_cli_compares_two_verification_networks_on_the_same_volumes(tmp_path) -> None:
    """``l3spot evaluate-levels --verify-weights A --verify-weights B`` renders each phantom
    once and runs the locator with each network: one summary per network and the paired
    figures in the JSON."""
    import json

    from typer.testing import CliRunner

    from core.config import LocatorConfig
    from l3spot import app
    from tests.conftest import require_shipped

    a = require_shipped(LocatorConfig().verify_weights, "spine weights")
    b = require_shipped(Path(a).with_name("spine_fcn_previous.pt"), "previous spine weights")
    out = tmp_path / "levels.json"
    args = ["evaluate-levels", "--style", "a", "--phantoms", "1", "--json", str(out)]
    done = CliRunner().invoke(app, [*args, "--verify-weights", str(a), "--verify-weights", str(b)])
    assert done.exit_code == 0, done.output
    doc = json.loads(out.read_text())
    assert list(doc["runs"]) == [str(a), str(b)]
    assert {k: len(v["cases"]) for k, v in doc["runs"].items()} == {str(a): 1, str(b): 1}
    names = [v["cases"][0]["name"] for v in doc["runs"].values()]
    assert names == ["a-1000000", "a-1000000"]
    assert doc["paired"]["scans"] <= 1 and 0.0 <= doc["paired"]["mcnemar_p"] <= 1.0
    assert "paired (" in done.output
