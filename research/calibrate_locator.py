"""Calibration of the L3 locator's confidence: P(answer within 10 mm of the true mid-L3).

The locator's raw confidence (``corr**2 * agreement * presence`` of the chosen run,
:func:`worker.locator.decision.decide_l3`) ranks answers but is not a probability: on the
real abdomen CT the answer was 2 slices off and its raw confidence 0.49 carried the
"low confidence" flag. This module measures, on *validation* phantoms, how often answers
of a given raw confidence are within 10 mm (Ha et al. 2021's technical success), fits a
monotone (isotonic) map raw -> probability, chooses the flag threshold, and writes the map
beside the first-stage weights (:mod:`worker.locator.calibration` reads it). Test phantoms
of another seed range give the reliability figures of the model card.

Never fitted on the real cases nor on the test phantoms it reports. numpy only
(scikit-learn is not a dependency; the pool-adjacent-violators fit is 20 lines).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import LocatorConfig
from research.evaluate_locator import SUCCESS_MM, locate_phantoms
from worker.locator.calibration import (
    CALIBRATION_FORMAT,
    SCORES,
    Calibration,
    LevelCalibration,
    calibration_score,
    file_sha256,
)


@dataclass
class CalibrationCase:
    """One phantom the locator ran on: its confidence features and the outcome.

    Attributes
    ----------
    seed : phantom seed.
    truth_in_fov : whether L3 is inside the phantom's field of view.
    answered : whether the locator gave a slice (said "in field of view").
    error_mm : |z of the answered slice - true mid-L3 z| (mm), None unless both exist.
    slice_mm : median slice spacing (mm).
    confidence_raw : the locator's raw confidence.
    correlation, agreement, presence : its parts (the chosen first-stage run).
    fine_correlation : the refinement stage's correlation (None without refinement).
    fine_applied : whether the refinement moved the answer.
    """

    seed: int
    truth_in_fov: bool
    answered: bool
    error_mm: float | None
    slice_mm: float
    confidence_raw: float
    correlation: float
    agreement: float
    presence: float | None
    fine_correlation: float | None
    fine_applied: bool | None

    @property
    def within(self) -> bool:
        """The outcome calibrated: a slice was answered and it is within 10 mm of the truth
        (an answer where L3 is absent counts as a failure)."""
        return self.answered and self.error_mm is not None and self.error_mm <= SUCCESS_MM


def collect_cases(
    n: int,
    seed: int,
    config: LocatorConfig,
    device: str = "auto",
    each: Callable[[CalibrationCase], None] | None = None,
) -> list[CalibrationCase]:
    """Run the configured two-stage locator on phantoms ``seed .. seed + n - 1``.

    Parameters
    ----------
    n, seed : number of phantoms and the first seed (keep them disjoint from the training
        seeds 0..1479 of both stages and from the seeds whose figures are reported).
    config : locator settings (first stage, refinement stage, strides).
    device : "auto", "cpu" or "cuda".
    each : called with every case as it is done (progress).

    Returns
    -------
    list of CalibrationCase
    """
    out = []
    for s, mip, z, res, _ in locate_phantoms(n, seed, config, device):
        sz = mip.slice_z_mm
        err = None
        if z is not None and res.slice_index is not None:
            err = abs(float(sz[res.slice_index]) - z)
        parts = res.confidence_parts
        ref = res.refinement
        case = CalibrationCase(
            seed=s,
            truth_in_fov=z is not None,
            answered=res.in_field_of_view,
            error_mm=None if err is None else round(err, 3),
            slice_mm=round(float(np.median(np.diff(sz))) if len(sz) > 1 else 1.0, 3),
            confidence_raw=round(float(res.confidence), 5),
            correlation=float(parts.get("correlation") or 0.0),
            agreement=float(parts.get("agreement") or 0.0),
            presence=parts.get("presence"),
            fine_correlation=None if ref is None else float(ref["correlation"]),
            fine_applied=None if ref is None else bool(ref["applied"]),
        )
        out.append(case)
        if each:
            each(case)
    return out


def save_cases(cases: Iterable[CalibrationCase], path: Path) -> None:
    """Write cases as JSON lines (one per phantom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(c)) + "\n" for c in cases))


def load_cases(path: Path) -> list[CalibrationCase]:
    """Read cases written by :func:`save_cases`."""
    return [CalibrationCase(**json.loads(line)) for line in path.read_text().splitlines() if line]


def fit_isotonic(
    x: np.ndarray, y: np.ndarray, laplace: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators).

    Parameters
    ----------
    x : (n,) scores (any order; equal scores are pooled).
    y : (n,) outcomes in [0, 1].
    laplace : report each pooled block's share as ``(k + 1) / (n + 2)`` (Laplace's rule of
        succession: a block of 130 right answers says 0.992, not certainty), then the
        running maximum so the map stays non-decreasing.

    Returns
    -------
    knots_x : (k,) strictly ascending: the lowest and the highest score of each block.
    knots_y : (k,) non-decreasing: the block's share (constant within a block).

    Raises
    ------
    ValueError
        Empty input or lengths differ.

    Notes
    -----
    Ayer et al. 1955, Barlow et al. 1972: the isotonic regression is the block means after
    repeatedly merging adjacent blocks that violate the order; adjacent blocks with equal
    means are merged too. Between knots the map is interpolated linearly
    (:meth:`worker.locator.calibration.Calibration.probabilities`).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size == 0 or x.shape != y.shape:
        raise ValueError("need as many outcomes as scores (and at least one)")
    ux, inverse = np.unique(x, return_inverse=True)  # equal scores form one block
    counts = np.bincount(inverse).astype(np.float64)
    sums_y = np.bincount(inverse, weights=y)
    # blocks: [first x, last x, sum_y, count], merged while the previous mean >= the last
    blocks: list[list[float]] = []
    for xi, sy, c in zip(ux, sums_y, counts, strict=True):
        blocks.append([float(xi), float(xi), float(sy), float(c)])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] >= blocks[-1][2] / blocks[-1][3]:
            _, last, by, bc = blocks.pop()
            blocks[-1][1] = last
            blocks[-1][2] += by
            blocks[-1][3] += bc
    share = np.array([(b[2] + 1) / (b[3] + 2) if laplace else b[2] / b[3] for b in blocks])
    share = np.maximum.accumulate(share)
    kx: list[float] = []
    ky: list[float] = []
    for b, p in zip(blocks, share, strict=True):
        for v in dict.fromkeys((b[0], b[1])):
            kx.append(v)
            ky.append(float(p))
    return np.array(kx), np.array(ky)


def flag_stats(p: np.ndarray, ok: np.ndarray, threshold: float) -> dict[str, Any]:
    """What a flag "probability below ``threshold``" does on a set of answers.

    Parameters
    ----------
    p : (n,) calibrated probabilities of the answers.
    ok : (n,) bool, answer within 10 mm.
    threshold : flag when ``p < threshold``.

    Returns
    -------
    dict
        ``flagged`` (count), ``flagged_share``, ``precision`` (share of the flagged that are
        > 10 mm off; None when nothing is flagged), ``recall`` (share of the > 10 mm answers
        flagged; None when there is none), ``n``, ``n_wrong``.
    """
    p = np.asarray(p, np.float64)
    ok = np.asarray(ok, bool)
    flagged = p < threshold
    wrong = ~ok
    nf, nw = int(flagged.sum()), int(wrong.sum())
    return {
        "threshold": round(float(threshold), 4),
        "n": int(p.size),
        "n_wrong": nw,
        "flagged": nf,
        "flagged_share": round(nf / p.size, 4) if p.size else None,
        "precision": round(float((flagged & wrong).sum()) / nf, 4) if nf else None,
        "recall": round(float((flagged & wrong).sum()) / nw, 4) if nw else None,
    }


def choose_threshold(p: np.ndarray, ok: np.ndarray, max_flagged_share: float = 0.10) -> float:
    """The flag threshold on the calibrated probability, chosen on validation answers.

    Parameters
    ----------
    p : (n,) calibrated probabilities (validation answers).
    ok : (n,) bool, answer within 10 mm.
    max_flagged_share : flag at most this share of the answers (a flag raised on most
        scans says nothing; the issue's complaint).

    Returns
    -------
    float
        The candidate threshold (a value between two distinct probabilities, or just above
        one) with the most > 10 mm answers flagged among those flagging at most
        ``max_flagged_share``; ties go to the higher precision, then the lower threshold.
        0 (flag nothing) when no candidate flags a wrong answer.

    Raises
    ------
    ValueError
        Empty input.
    """
    p = np.asarray(p, np.float64)
    ok = np.asarray(ok, bool)
    if p.size == 0:
        raise ValueError("no answers to choose a threshold on")
    levels = np.unique(p)
    candidates = [float(v) + 1e-6 for v in levels]  # flag p <= level
    best, best_key = 0.0, (0, 0.0, 0.0)
    for t in candidates:
        flagged = p < t
        nf = int(flagged.sum())
        if nf == 0 or nf / p.size > max_flagged_share:
            continue
        hits = int((flagged & ~ok).sum())
        key = (hits, hits / nf, -t)
        if hits > 0 and key > best_key:
            best, best_key = t, key
    return round(best, 6)


def reliability_table(
    p: np.ndarray, ok: np.ndarray, edges: Sequence[float] = (0, 0.5, 0.8, 0.9, 0.95, 1.0)
) -> list[dict[str, Any]]:
    """Reliability by bins of predicted probability: count, mean predicted, observed share.

    Parameters
    ----------
    p : (n,) predicted probabilities.
    ok : (n,) bool outcomes.
    edges : bin edges in [0, 1], ascending (the last bin includes 1).

    Returns
    -------
    list of dict
        One per non-empty bin: ``bin`` "[lo, hi)", ``n``, ``mean_predicted``, ``observed``.
    """
    p = np.asarray(p, np.float64)
    ok = np.asarray(ok, bool)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        sel = (p >= lo) & ((p <= hi) if last else (p < hi))
        if not sel.any():
            continue
        rows.append(
            {
                "bin": f"[{lo:g}, {hi:g}{']' if last else ')'}",
                "n": int(sel.sum()),
                "mean_predicted": round(float(p[sel].mean()), 3),
                "observed": round(float(ok[sel].mean()), 3),
            }
        )
    return rows


def brier(p: np.ndarray, ok: np.ndarray) -> float:
    """Brier score: mean squared difference of probability and outcome (lower is better)."""
    p = np.asarray(p, np.float64)
    return round(float(np.mean((p - np.asarray(ok, np.float64)) ** 2)), 5)


def auc(score: np.ndarray, ok: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for telling answers within 10 mm (``ok``) from
    the others (ties count half); None without both kinds."""
    score = np.asarray(score, np.float64)
    ok = np.asarray(ok, bool)
    pos, neg = score[ok], score[~ok]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return round(float(greater + 0.5 * ties), 4)


def case_scores(cases: Sequence[CalibrationCase], name: str) -> np.ndarray:
    """(n,) the calibration score ``name`` of each case
    (:func:`worker.locator.calibration.calibration_score`, the rule inference uses)."""
    return np.array([calibration_score(name, c.confidence_raw, c.fine_correlation) for c in cases])


def candidate_scores(cases: Sequence[CalibrationCase]) -> dict[str, np.ndarray]:
    """Scores per answered case: those a calibration can map
    (:data:`worker.locator.calibration.SCORES`), and for comparison the raw confidence's
    parts and the refinement's correlation alone."""
    out = {name: case_scores(cases, name) for name in SCORES}
    out["agreement"] = np.array([c.agreement for c in cases])
    out["presence"] = np.array([c.presence or 0.0 for c in cases])
    out["fine_correlation"] = np.array([max(c.fine_correlation or 0.0, 0.0) for c in cases])
    return out


def build_calibration(
    cases: Sequence[CalibrationCase],
    config: LocatorConfig,
    provenance: dict[str, Any],
    max_flagged_share: float = 0.10,
    score: str | None = None,
) -> Calibration:
    """Fit the map and the flag threshold on validation cases (answers only).

    Parameters
    ----------
    cases : validation phantoms (:func:`collect_cases`); those the locator said "not in
        field of view" are left out (no answer, nothing to be within 10 mm).
    config : the locator the cases came from (its weight files are fingerprinted: the map
        applies to exactly those).
    provenance : command, seeds, commit... stored in the file as they are.
    max_flagged_share : see :func:`choose_threshold`.
    score : the score to map (:data:`worker.locator.calibration.SCORES`); None = the one
        with the highest AUC on these validation answers (ties: the first, the raw
        confidence).

    Returns
    -------
    Calibration
        Probabilities by :func:`fit_isotonic` with Laplace smoothing.

    Raises
    ------
    ValueError
        No answered case, or an unknown score.
    """
    ans = [c for c in cases if c.answered]
    if not ans:
        raise ValueError("no validation phantom with an answer: nothing to calibrate")
    ok = np.array([c.within for c in ans])
    aucs = {k: auc(v, ok) for k, v in candidate_scores(ans).items()}
    if score is None:
        score = max(SCORES, key=lambda k: (aucs[k] or 0.0, -SCORES.index(k)))
    if score not in SCORES:
        raise ValueError(f"unknown calibration score {score!r} (one of {SCORES})")
    x = case_scores(ans, score)
    kx, ky = fit_isotonic(x, ok.astype(np.float64), laplace=True)
    draft = Calibration(
        knots_raw=tuple(float(v) for v in kx),
        knots_probability=tuple(float(v) for v in ky),
        flag_below=0.0,
        coarse_sha256=file_sha256(config.weights),
        fine_sha256=None if config.refine_weights is None else file_sha256(config.refine_weights),
        score=score,
    )
    p = draft.probabilities(x)
    t = choose_threshold(p, ok, max_flagged_share)
    record = {
        "format": CALIBRATION_FORMAT,
        **provenance,
        "outcome": f"answer within {SUCCESS_MM:g} mm of the true mid-L3 (phantom truth)",
        "score": score,
        "score_choice": "given" if provenance.get("score_given") else "highest validation AUC",
        "n_validation_phantoms": len(cases),
        "n_validation_answers": len(ans),
        "n_validation_within": int(ok.sum()),
        "max_flagged_share": max_flagged_share,
        "validation_flag": flag_stats(p, ok, t),
        "validation_brier": brier(p, ok),
        "validation_auc_of_candidate_scores": aucs,
        "weights": Path(config.weights).name,
        "refine_weights": None if config.refine_weights is None else config.refine_weights.name,
    }
    return dataclasses.replace(draft, flag_below=t, record=record)


def cached_cases(
    n: int,
    seed: int,
    config: LocatorConfig,
    cache_dir: Path | None,
    device: str = "auto",
    each: Callable[[CalibrationCase], None] | None = None,
) -> list[CalibrationCase]:
    """:func:`collect_cases` with the cases kept in ``<cache_dir>/cases-<weights>.jsonl``.

    ``<weights>`` is the first 12 hex digits of the first- and refinement-stage weights'
    SHA-256, so other weights never reuse the cases. Every case is appended as soon as it
    is done (a long run can be stopped and resumed); seeds already there are not run again.
    ``cache_dir`` None: no cache.
    """
    if cache_dir is None:
        return collect_cases(n, seed, config, device, each)
    fine = "none" if config.refine_weights is None else file_sha256(config.refine_weights)[:12]
    path = Path(cache_dir) / f"cases-{file_sha256(config.weights)[:12]}-{fine}.jsonl"
    known = {c.seed: c for c in load_cases(path)} if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        s = seed
        while s < seed + n:
            if s in known:
                s += 1
                continue
            stop = s
            while stop < seed + n and stop not in known:
                stop += 1

            def keep(case: CalibrationCase) -> None:
                known[case.seed] = case
                f.write(json.dumps(asdict(case)) + "\n")
                f.flush()
                if each:
                    each(case)

            collect_cases(stop - s, s, config, device, keep)
            s = stop
    return [known[s] for s in range(seed, seed + n)]


_MAP_COLOURS = (
    (0, 70, 200),
    (0, 150, 60),
    (200, 120, 0),
    (150, 0, 150),
    (90, 90, 90),
    (0, 160, 170),
    (170, 60, 40),
    (120, 120, 0),
)


def _maps(calibration: Calibration | LevelCalibration) -> dict[str, np.ndarray]:
    """label -> the map's probabilities on 201 scores from 0 to 1 ("" for a single map)."""
    grid = np.linspace(0, 1, 201)
    if isinstance(calibration, Calibration):
        return {"": calibration.probabilities(grid)}
    return {v: np.interp(grid, kx, ky) for v, (kx, ky) in calibration.maps.items()}


def render_reliability_png(
    sets: Sequence[tuple[str, np.ndarray, np.ndarray, tuple[int, int, int]]],
    calibration: Calibration | LevelCalibration,
    out: Path,
    edges: Sequence[float] = (0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0),
) -> Path:
    """Draw the reliability diagram (left) and the calibration map (right) as a PNG.

    Parameters
    ----------
    sets : (label, calibrated probabilities (n,), outcomes within 10 mm (n,) bool, RGB)
        per data set (validation, test).
    calibration : the map drawn on the right (score -> probability) with its flag
        threshold; a level calibration draws one map per verdict, each in its own colour.
    out : PNG path (folders created).
    edges : probability bins of the diagram.

    Returns
    -------
    Path
        ``out``.

    Notes
    -----
    Left: per bin, the observed share within 10 mm against the mean predicted probability
    (a dot, its area by the number of answers, the count beside it); the diagonal is perfect
    calibration; the dashed line the flag threshold. Right: the isotonic map and the
    threshold. PIL only (matplotlib is not a dependency).
    """
    from PIL import Image, ImageDraw

    size, pad, gap = 360, 48, 40
    img = Image.new("RGB", (2 * size + 2 * pad + gap + 20, size + 2 * pad), "white")
    d = ImageDraw.Draw(img)

    def panel(x0: int, title: str, xlabel: str, ylabel: str) -> Callable[[float, float], tuple]:
        d.rectangle([x0, pad, x0 + size, pad + size], outline="black")
        for v in (0.0, 0.25, 0.5, 0.75, 1.0):
            px, py = x0 + v * size, pad + size - v * size
            d.line([px, pad + size, px, pad + size + 4], fill="black")
            d.line([x0 - 4, py, x0, py], fill="black")
            d.text((px - 8, pad + size + 6), f"{v:g}", fill="black")
            d.text((x0 - 30, py - 5), f"{v:g}", fill="black")
        d.text((x0, pad - 30), title, fill="black")
        d.text((x0 + size // 2 - 60, pad + size + 22), xlabel, fill="black")
        d.text((x0 - 44, pad - 16), ylabel, fill="black")
        return lambda x, y: (x0 + x * size, pad + size - y * size)

    def dashed_h(to: Callable, y: float) -> None:
        for k in range(0, 40, 2):
            d.line([to(k / 40, y), to((k + 1) / 40, y)], fill=(200, 0, 0), width=1)

    def dashed_v(to: Callable, x: float) -> None:
        for k in range(0, 40, 2):
            d.line([to(x, k / 40), to(x, (k + 1) / 40)], fill=(200, 0, 0), width=1)

    left = panel(pad, "Reliability: P(within 10 mm)", "predicted probability", "observed")
    d.line([left(0, 0), left(1, 1)], fill=(160, 160, 160))
    dashed_v(left, calibration.flag_below)
    for k, (label, p, ok, rgb) in enumerate(sets):
        d.text((pad + size - 190, pad + size - 34 + 14 * k), f"o {label} (n={len(p)})", fill=rgb)
        for row in reliability_table(p, ok, edges):
            cx, cy = left(row["mean_predicted"], row["observed"])
            r = 2 + 2 * np.sqrt(row["n"])
            r = min(r, 14)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=2)
            d.text((cx + r + 2, cy - 6 + 12 * k), str(row["n"]), fill=rgb)
    x0 = 2 * pad + size + gap
    right = panel(x0, "Calibration map (validation)", calibration.score, "P(within 10 mm)")
    grid = np.linspace(0, 1, 201)
    for k, (label, curve) in enumerate(_maps(calibration).items()):
        rgb = _MAP_COLOURS[k % len(_MAP_COLOURS)]
        pts = [right(float(g), float(v)) for g, v in zip(grid, curve, strict=True)]
        d.line(pts, fill=rgb, width=2)
        if label:
            d.text((x0 + size - 90, pad + size - 20 - 12 * k), label, fill=rgb)
    dashed_h(right, calibration.flag_below)
    d.text(
        right(0.02, calibration.flag_below + 0.03),
        f"flag below {calibration.flag_below:.3f}",
        fill=(200, 0, 0),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
