"""Evaluation of the L3 locator.

Per case: error in slices and in mm against the reference L3 slice, the not-in-field-of-view
decision, time per scan. Overall: mean +/- sd, median, max, and the share within 10 mm
("technical success", Ha et al. 2021).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import LocatorConfig
from worker.locator.locate import L3Location, locate_l3
from worker.mip import Mip
from worker.volume.load import CTVolume

#: Ha et al. 2021: a slice within 10 mm of the reference counts as a technical success.
SUCCESS_MM = 10.0


@dataclass
class CaseResult:
    """One evaluated scan.

    ``truth_slice`` None = L3 not in the field of view; ``error_slices``/``error_mm`` are
    None unless both truth and prediction are in the field of view.
    """

    name: str
    truth_slice: int | None
    truth_z_mm: float | None
    pred_slice: int | None
    pred_z_mm: float | None
    confidence: float
    slice_mm: float
    seconds: float
    reason: str | None = None
    refined: bool | None = None  # None: no refinement stage ran; else whether it was applied

    @property
    def error_slices(self) -> int | None:
        if self.truth_slice is None or self.pred_slice is None:
            return None
        return abs(self.pred_slice - self.truth_slice)

    @property
    def error_mm(self) -> float | None:
        if self.truth_z_mm is None or self.pred_z_mm is None:
            return None
        return abs(self.pred_z_mm - self.truth_z_mm)

    @property
    def fov_correct(self) -> bool:
        return (self.truth_slice is None) == (self.pred_slice is None)

    def row(self) -> dict[str, Any]:
        return {
            "case": self.name,
            "truth_slice": self.truth_slice,
            "pred_slice": self.pred_slice,
            "err_slices": self.error_slices,
            "err_mm": None if self.error_mm is None else round(self.error_mm, 2),
            "slice_mm": round(self.slice_mm, 2),
            "confidence": round(self.confidence, 3),
            "fov_ok": self.fov_correct,
            "seconds": round(self.seconds, 3),
            "refined": self.refined,
        }


def evaluate_case(
    name: str,
    volume: CTVolume,
    truth_z_mm: float | None,
    config: LocatorConfig,
    device: str = "auto",
) -> CaseResult:
    """Locate L3 in one volume and compare with the reference z (None = not in FOV)."""
    t0 = time.perf_counter()
    loc = locate_l3(volume, config, device=device)
    dt = time.perf_counter() - t0
    truth_slice = None if truth_z_mm is None else volume.nearest_slice(truth_z_mm)
    truth_z = None if truth_slice is None else truth_z_mm
    return CaseResult(
        name,
        truth_slice,
        truth_z,
        loc.slice_index,
        None if loc.slice_index is None else float(volume.z_mm[loc.slice_index]),
        loc.confidence,
        volume.slice_spacing_mm,
        dt,
        loc.reason,
        None if loc.refinement is None else bool(loc.refinement["applied"]),
    )


def summarise(results: Iterable[CaseResult]) -> dict[str, Any]:
    """Overall figures: errors (slices, mm: mean, sd, median, max), share within 10 mm (of
    the cases whose L3 is in the field of view; a missed L3 counts as a failure), not-in-FOV
    decisions, time per scan."""
    res = list(results)
    in_fov = [r for r in res if r.truth_slice is not None]
    found = [r for r in in_fov if r.pred_slice is not None]
    es = np.array([r.error_slices for r in found], np.float64)
    em = np.array([r.error_mm for r in found], np.float64)

    def stats(a: np.ndarray) -> dict[str, float | None]:
        if a.size == 0:
            return {"mean": None, "sd": None, "median": None, "max": None}
        return {
            "mean": round(float(a.mean()), 3),
            "sd": round(float(a.std()), 3),
            "median": round(float(np.median(a)), 3),
            "max": round(float(a.max()), 3),
        }

    absent = [r for r in res if r.truth_slice is None]
    ran = [r for r in res if r.refined is not None]
    within = sum(1 for r in found if (r.error_mm or 0.0) <= SUCCESS_MM)
    times = np.array([r.seconds for r in res]) if res else np.zeros(1)
    return {
        "n_cases": len(res),
        "n_l3_in_fov": len(in_fov),
        "error_slices": stats(es),
        "error_mm": stats(em),
        "within_10mm": f"{within}/{len(in_fov)}",
        "within_10mm_share": round(within / len(in_fov), 4) if in_fov else None,
        "missed_l3_said_not_in_fov": len(in_fov) - len(found),
        "not_in_fov_cases": len(absent),
        "not_in_fov_correct": sum(1 for r in absent if r.pred_slice is None),
        "not_in_fov_incorrect": sum(1 for r in absent if r.pred_slice is not None),
        "refinement_applied": (f"{sum(1 for r in ran if r.refined)}/{len(ran)}" if ran else None),
        "seconds_per_scan": {
            "mean": round(float(times.mean()), 3),
            "max": round(float(times.max()), 3),
        },
    }


#: A phantom source: (seed, MIP pixel sizes) -> (one MIP per size, mid-L3 z or None).
PhantomSource = Callable[[int, tuple[float, ...]], tuple[list[Mip], float | None]]


def style_a_mips(seed: int, pixel_mms: tuple[float, ...]) -> tuple[list[Mip], float | None]:
    """Style A (:mod:`worker.phantom`, the training generator), evaluation settings."""
    from worker.training.locator import phantom_mips

    return phantom_mips(seed, pixel_mms, training=False)


def style_b_mips(seed: int, pixel_mms: tuple[float, ...]) -> tuple[list[Mip], float | None]:
    """Style B (:mod:`research.phantom_b`, validation only), its validation settings."""
    from research.phantom_b import validation_mips

    return validation_mips(seed, pixel_mms)


#: Phantom styles by name (``l3spot evaluate --style``).
STYLES: dict[str, PhantomSource] = {"a": style_a_mips, "b": style_b_mips}


def locate_phantoms(
    n: int,
    seed: int,
    config: LocatorConfig,
    device: str = "auto",
    source: PhantomSource = style_a_mips,
) -> Iterator[tuple[int, Mip, float | None, L3Location, float]]:
    """Run the configured locator (both stages) on ``n`` phantoms, seeds ``seed ..``.

    Yields
    ------
    (seed, first-stage MIP, mid-L3 z in mm or None when L3 is outside the field of view,
    the locator's result, seconds of windows + CNN + decision (+ refinement)).

    Notes
    -----
    Phantoms from ``source``: by default style A (:func:`style_a_mips`: evaluation
    settings, the generator's field of view, slice thickness 0.625-5 mm, low in-plane
    resolution); style B (:func:`style_b_mips`) is the validation-only generator of issue
    15. Used by :func:`evaluate_phantoms` and by the confidence calibration
    (:mod:`research.calibrate_locator`).
    """
    from worker.locator.locate import load_stages, locate_in_mip

    stages = load_stages(config, device)
    loc, fine = stages.coarse, stages.fine
    pixels = (loc.spec.pixel_mm,) if fine is None else (loc.spec.pixel_mm, fine.spec.pixel_mm)
    for s in range(seed, seed + n):
        mips, z = source(s, pixels)
        t0 = time.perf_counter()
        res = locate_in_mip(
            mips[0],
            loc,
            config.stride_px,
            config.batch_size,
            config.min_confidence,
            None if fine is None else (mips[1], fine),
            config.refine_stride_px,
            stages.calibration,
        )
        yield s, mips[0], z, res, time.perf_counter() - t0


def evaluate_phantoms(
    n: int,
    seed: int,
    config: LocatorConfig,
    device: str = "auto",
    each: Callable[[CaseResult], None] | None = None,
    source: PhantomSource = style_a_mips,
    name: str = "phantom",
) -> list[CaseResult]:
    """Evaluate on ``n`` phantoms with seeds ``seed .. seed + n - 1``.

    Keep the seeds disjoint from the training seeds (the shipped model trained on seeds
    below 1 000 000). Phantoms come from ``source`` (:func:`locate_phantoms`: style A by
    default, style B for the validation-only generator of issue 15). The locator runs on
    their frontal MIPs directly (the MIP of a volume is timed in ``bench/bench_locate.py``),
    so ``seconds`` is the time of windows + CNN + decision (+ the refinement stage when
    configured). Cases are named ``<name>-<seed>``.
    """
    out = []
    for s, mip, z, res, dt in locate_phantoms(n, seed, config, device, source):
        sz = mip.slice_z_mm
        truth = None if z is None else int(np.argmin(np.abs(sz - z)))
        r = CaseResult(
            f"{name}-{s}",
            truth,
            z,
            res.slice_index,
            None if res.slice_index is None else float(sz[res.slice_index]),
            res.confidence,
            float(np.median(np.diff(sz))) if len(sz) > 1 else 1.0,
            dt,
            res.reason,
            None if res.refinement is None else bool(res.refinement["applied"]),
        )
        out.append(r)
        if each:
            each(r)
    return out


def evaluate_csv(
    path: Path,
    config: LocatorConfig,
    loader: Callable[[Path], CTVolume],
    device: str = "auto",
    each: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Evaluate on a CSV ``series_path,l3_slice_index`` (empty/negative = not in FOV)."""
    from worker.training.locator import read_case_csv

    out = []
    for sp, idx, _ in read_case_csv(path):
        vol = loader(sp)
        z = None if idx is None else float(vol.z_mm[idx])
        r = evaluate_case(str(sp), vol, z, config, device)
        out.append(r)
        if each:
            each(r)
    return out
