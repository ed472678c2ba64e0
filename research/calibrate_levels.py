"""Calibration of the whole locator's answer on the level verification's verdict.

The first stage's calibration (:mod:`research.calibrate_locator`) maps its score to
P(within 10 mm) on style-A validation phantoms, before any vertebra is counted. The answer a
radiologist reads comes after the count: confirmed by it, corrected, found by counting,
unchecked, or flagged as possibly transitional, and how often each is right differs far
more than the first stage's score does. This module fits one monotone map of the same score
per verdict (:func:`worker.locator.calibration.verdict_of`) on the cases
``l3spot evaluate-levels --json`` wrote for validation phantoms (style B: never trained on,
the issue's validation style), chooses the flag threshold on them, and reports reliability
on cases of other seeds (test). Never fitted on the real case nor on the test cases it
reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from research.calibrate_locator import (
    brier,
    choose_threshold,
    fit_isotonic,
    flag_stats,
    reliability_table,
)
from research.evaluate_levels import LevelCase, within_10mm
from worker.locator.calibration import (
    LEVEL_CALIBRATION_FORMAT,
    LevelCalibration,
    calibration_score,
    verdict_of,
)
from worker.pipeline import LOW_CONFIDENCE_FLAG

__all__ = [
    "LEVEL_SCORE",
    "answered",
    "build_level_calibration",
    "case_verdict",
    "level_probabilities",
    "level_report",
    "load_level_cases",
    "outcomes",
    "read_level_cases",
]

#: the score the maps are of: the first stage's calibrated score (models/locator_cnn4.md)
LEVEL_SCORE = "raw_x_fine_correlation2"


def read_level_cases(path: Path) -> tuple[list[LevelCase], dict[str, str | None]]:
    """The cases of one ``evaluate-levels --json`` file, in seed order, and the SHA-256 of
    the weights that made them (``weights``, ``refine_weights``, ``verify_weights``).

    Raises
    ------
    ValueError
        Not a single-run ``evaluate-levels --json`` file, or written before it recorded
        the weights (cases of unknown weights cannot be calibrated on).
    """
    doc = json.loads(Path(path).read_text())
    if "cases" not in doc or "weights_sha256" not in doc:
        raise ValueError(
            f"{path}: not a single-run evaluate-levels --json file that names its weights"
        )
    known = {f.name for f in fields(LevelCase)}
    cases = [
        LevelCase(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in row.items() if k in known}
        )
        for row in doc["cases"]
    ]
    return cases, dict(doc["weights_sha256"])


def load_level_cases(paths: Sequence[Path]) -> tuple[list[LevelCase], dict[str, str | None]]:
    """The cases of several files made with the same weights.

    Raises
    ------
    ValueError
        No file, a file :func:`read_level_cases` refuses, files of different weights, or a
        phantom in two files.
    """
    if not paths:
        raise ValueError("no evaluate-levels file given")
    runs = [(p, *read_level_cases(p)) for p in paths]
    shas = runs[0][2]
    for path, _, other in runs[1:]:
        if other != shas:
            raise ValueError(f"{path} was made with other weights than {runs[0][0]}")
    cases = [c for _, run, _ in runs for c in run]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("a phantom appears in more than one file")
    return cases, shas


def case_verdict(case: LevelCase) -> str | None:
    """The verdict group of one evaluated answer, by the rule inference uses
    (:func:`worker.locator.calibration.verdict_of`; evaluations apply corrections)."""
    if case.status is None:
        return None
    return verdict_of(
        {
            "status": case.status,
            "possible_transitional_anatomy": case.flagged_transitional,
            "applied": True,
        }
    )


def answered(cases: Sequence[LevelCase]) -> list[LevelCase]:
    """The cases with an answer (a slice), whether or not mid-L3 is in the scan."""
    return [c for c in cases if c.final_z_mm is not None and c.confidence_raw is not None]


def outcomes(cases: Sequence[LevelCase]) -> np.ndarray:
    """(n,) bool: the answer is within 10 mm of mid-L3 (an answer on a scan without mid-L3
    is wrong)."""
    return np.array([within_10mm(c.error_after_mm) for c in cases], bool)


def _scores(cases: Sequence[LevelCase]) -> np.ndarray:
    return np.array(
        [calibration_score(LEVEL_SCORE, c.confidence_raw or 0.0, c.fine_correlation) for c in cases]
    )


def build_level_calibration(
    cases: Sequence[LevelCase],
    weights_sha256: dict[str, str | None],
    provenance: dict[str, Any],
    max_flagged_share: float,
) -> LevelCalibration:
    """Fit one map per verdict and the flag threshold on validation cases.

    Parameters
    ----------
    cases : validation phantoms' cases (:func:`load_level_cases`); answers only are used.
    weights_sha256 : the weights that made them (the calibration applies to exactly those).
    provenance : command, seeds, commit, stored as they are.
    max_flagged_share : flag at most this share of the validation answers
        (:func:`research.calibrate_locator.choose_threshold`).

    Returns
    -------
    LevelCalibration
        Each verdict's map is :func:`research.calibrate_locator.fit_isotonic` of the first
        stage's score (:data:`LEVEL_SCORE`) with Laplace's rule, on that verdict's answers;
        a verdict without an answer gets no map (its answers keep the first stage's
        confidence).

    Raises
    ------
    ValueError
        No answer with a verdict, or weights not named.
    """
    ans = [c for c in answered(cases) if case_verdict(c) is not None]
    if not ans:
        raise ValueError("no validation answer with a level verdict: nothing to calibrate")
    if not weights_sha256.get("weights") or not weights_sha256.get("verify_weights"):
        raise ValueError("the cases do not name their first-stage and verification weights")
    ok = outcomes(ans)
    x = _scores(ans)
    verdicts = np.array([case_verdict(c) for c in ans])
    maps: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
    for v in dict.fromkeys(verdicts.tolist()):
        sel = verdicts == v
        kx, ky = fit_isotonic(x[sel], ok[sel].astype(np.float64), laplace=True)
        maps[v] = (tuple(float(a) for a in kx), tuple(float(b) for b in ky))
    draft = LevelCalibration(
        maps=maps,
        flag_below=0.0,
        score=LEVEL_SCORE,
        coarse_sha256=str(weights_sha256["weights"]),
        fine_sha256=weights_sha256.get("refine_weights"),
        verify_sha256=str(weights_sha256["verify_weights"]),
    )
    t = choose_threshold(level_probabilities(draft, ans), ok, max_flagged_share)
    record = {
        "format": LEVEL_CALIBRATION_FORMAT,
        **provenance,
        "outcome": "final answer within 10 mm of the true mid-L3 (phantom truth); an answer "
        "on a scan without mid-L3 counts as wrong",
        "score": LEVEL_SCORE,
        "max_flagged_share": max_flagged_share,
        "validation": level_report(draft, ans, t),
    }
    return dataclasses.replace(draft, flag_below=t, record=record)


def level_probabilities(cal: LevelCalibration, cases: Sequence[LevelCase]) -> np.ndarray:
    """(n,) P(within 10 mm) of each answered case: the level calibration where it has a map
    for the case's verdict, else the case's reported confidence."""
    out = []
    for c in cases:
        p = cal.probability(case_verdict(c), c.confidence_raw or 0.0, c.fine_correlation)
        out.append(c.confidence if p is None else p)
    return np.array(out, np.float64)


def level_report(
    cal: LevelCalibration, cases: Sequence[LevelCase], threshold: float | None = None
) -> dict[str, Any]:
    """Figures of ``cal`` on a set of cases (answers only), beside what the answers carried
    when evaluated (the first stage's confidence and the QA flags of the time).

    Returns
    -------
    dict
        ``n`` answers, ``n_wrong``; ``per_verdict`` (answers, wrong, mean probability);
        ``flag`` (:func:`research.calibrate_locator.flag_stats` at ``threshold``, default
        ``cal.flag_below``); ``brier`` and ``brier_first_stage`` (on ``confidence_locator``,
        or on ``confidence`` in files written before it, right only where no level
        calibration was in place); ``reliability``; and
        ``flags_then``: how many answers carried any QA flag when evaluated, how many of
        those were wrong and how many wrong answers carried none; ``flags_now``: the same
        with ``low_l3_confidence`` raised by this calibration instead of the first stage's.
    """
    ans = answered(cases)
    ok = outcomes(ans)
    p = level_probabilities(cal, ans)
    first = np.array(
        [
            (c.confidence if c.confidence_locator is None else c.confidence_locator) or 0.0
            for c in ans
        ]
    )
    t = cal.flag_below if threshold is None else threshold
    verdicts = [case_verdict(c) or "none" for c in ans]
    per = {}
    for v in dict.fromkeys(verdicts):
        sel = np.array([w == v for w in verdicts])
        per[v] = {
            "answers": int(sel.sum()),
            "wrong": int((~ok[sel]).sum()),
            "mean_probability": round(float(p[sel].mean()), 3),
        }
    flagged_then = np.array([bool(c.flags) for c in ans], bool)
    # the same answers with ``low_l3_confidence`` raised by this calibration instead
    flagged_now = np.array([bool(set(c.flags) - {LOW_CONFIDENCE_FLAG}) for c in ans], bool)
    flagged_now |= p < t
    return {
        "n": len(ans),
        "n_wrong": int((~ok).sum()),
        "per_verdict": per,
        "flag": flag_stats(p, ok, t),
        "brier": brier(p, ok) if len(ans) else None,
        "brier_first_stage": brier(first, ok) if len(ans) else None,
        "reliability": reliability_table(p, ok),
        "flags_then": _flag_counts(flagged_then, ok),
        "flags_now": _flag_counts(flagged_now, ok),
    }


def _flag_counts(flagged: np.ndarray, ok: np.ndarray) -> dict[str, int]:
    """Answers flagged, wrong ones among them, wrong ones without a flag ((n,) bool each)."""
    return {
        "flagged": int(flagged.sum()),
        "wrong_among_flagged": int((flagged & ~ok).sum()),
        "wrong_unflagged": int((~flagged & ~ok).sum()),
    }
