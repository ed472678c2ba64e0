"""The before/after figures of the whole locator with the level verification
(research/evaluate_levels.py)."""

from __future__ import annotations

import pytest

from research.evaluate_levels import LevelCase, format_levels, phantom_volumes, summarise


def _case(name, truth, before, after, status, transitional=None, flagged=False) -> LevelCase:
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


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        next(phantom_volumes("c", range(1)))
