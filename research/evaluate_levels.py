"""The whole locator (first stage, refinement, level verification) on phantom volumes.

``l3spot evaluate`` runs the locator on frontal MIPs, which is fast but cannot run the level
verification: that counts vertebrae in the volume (:mod:`worker.locator.vertebrae`). This
evaluation renders each phantom's volume and runs :func:`worker.locator.locate.locate_l3`
as the pipeline does, so every answer is reported twice: the locator's own (before) and
after the verification, with its verdict. Style A is the training generator (held-out seeds
only); style B (:mod:`research.phantom_b`) is the validation-only generator, never trained
on. ``l3spot evaluate-levels`` prints the table (models/spine_fcn.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.config import LocatorConfig
from research.evaluate_locator import SUCCESS_MM
from research.phantom_b import StyleBSpec
from worker.pipeline import LOW_CONFIDENCE_FLAG
from worker.volume.load import CTVolume

__all__ = [
    "LevelCase",
    "compare_verification",
    "evaluate_levels",
    "ends_in_view",
    "format_levels",
    "paired",
    "phantom_volumes",
    "summarise",
    "transitional_spec",
    "weights_sha256",
    "within_10mm",
]


@dataclass
class LevelCase:
    """One phantom: the truth, the locator's answer, the verified answer (z in mm)."""

    name: str
    transitional: str | None
    truth_z_mm: float | None  # mid-L3, None when outside the scan
    l3_range_mm: tuple[float, float] | None
    in_fov_said: bool
    locator_z_mm: float | None
    final_z_mm: float | None
    status: str | None  # the verification's, None when it did not run
    counted_by: str | None
    flagged_transitional: bool
    lumbar_counted: int | None
    seconds_verify: float
    #: a radiologist could count to L3 in this scan (the issue's "in the field of view":
    #: :func:`worker.training.locator.countable_in_z`); None when unknown
    countable: bool | None = None
    #: the QA flags the answer carries (the level verification's and ``low_l3_confidence``):
    #: a wrong answer without any is a silent one
    flags: tuple[str, ...] = ()
    #: the reported confidence (the first stage's calibrated P(within 10 mm), or its raw
    #: score without a calibration or for an L3 found by counting), the raw score and the
    #: refinement's slope -1 correlation: what a verdict-aware calibration is fitted on
    confidence: float | None = None
    #: the first stage's confidence: ``confidence`` unless a level calibration replaced it
    #: (None in files written before this field)
    confidence_locator: float | None = None
    confidence_raw: float | None = None
    fine_correlation: float | None = None
    #: (bottom, top) z (mm) of L3 by the count from the ribs and from the sacrum, None where
    #: that count was not made
    l3_from_ribs_mm: tuple[float, float] | None = None
    l3_from_sacrum_mm: tuple[float, float] | None = None
    #: the ends a reader could count from in this scan (:func:`ends_in_view`): "both",
    #: "ribs", "sacrum" or "neither"; None in files written before this field
    ends_in_view: str | None = None
    #: the scan's slice spacing (mm), for the error in slices (the issue's "mean <= 1
    #: slice"); None in files written before this field
    slice_mm: float | None = None

    def _err(self, z: float | None) -> float | None:
        if z is None or self.truth_z_mm is None:
            return None
        return abs(z - self.truth_z_mm)

    @property
    def error_before_mm(self) -> float | None:
        return self._err(self.locator_z_mm)

    @property
    def error_after_mm(self) -> float | None:
        return self._err(self.final_z_mm)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["error_before_mm"] = self.error_before_mm
        d["error_after_mm"] = self.error_after_mm
        return d


def _style_a(seed: int) -> tuple[CTVolume, dict[str, Any]]:
    from worker.phantom import generate_phantom
    from worker.training.locator import phantom_spec

    p = generate_phantom(seed, phantom_spec(seed, training=False))
    t = p.truth
    return p.volume, {
        "in_fov": t.l3_in_fov,
        "countable": _countable(t.vertebrae_z_mm, p.volume),
        "ends": ends_in_view(t.vertebrae_z_mm, p.volume),
        "mid": t.l3_mid_z_mm,
        "range": t.l3_z_range_mm,
        "transitional": t.variants.get("transitional"),
    }


def _countable(vertebrae_z_mm: dict[str, tuple[float, float]], vol: CTVolume) -> bool:
    from worker.training.locator import countable_in_z

    return countable_in_z(vertebrae_z_mm, float(vol.z_mm[0]), float(vol.z_mm[-1]))


def ends_in_view(vertebrae_z_mm: dict[str, tuple[float, float]], vol: CTVolume) -> str:
    """The ends a reader could count the lumbar vertebrae from in ``vol``
    (:func:`worker.training.locator.count_ends_in_z`): "both", "ribs", "sacrum" or
    "neither". Transitional anatomy can be seen by counting only with "both"."""
    from worker.training.locator import count_ends_in_z

    ribs, sacrum = count_ends_in_z(vertebrae_z_mm, float(vol.z_mm[0]), float(vol.z_mm[-1]))
    return {(True, True): "both", (True, False): "ribs", (False, True): "sacrum"}.get(
        (ribs, sacrum), "neither"
    )


def _style_b(
    seed: int, spec: StyleBSpec | None = None, pixel_mm: float | None = None
) -> tuple[CTVolume, dict[str, Any]]:
    from research.phantom_b import at_pixel_size, generate, validation_spec

    spec = spec or validation_spec(seed)
    if pixel_mm is not None:
        spec = at_pixel_size(spec, pixel_mm)
    vol, t = generate(seed, spec)
    return vol, {
        "in_fov": t.l3_in_fov,
        "countable": _countable(t.vertebrae_z_mm, vol),
        "ends": ends_in_view(t.vertebrae_z_mm, vol),
        "mid": t.l3_mid_z_mm,
        "range": tuple(t.vertebrae_z_mm["L3"]),
        "transitional": t.variants.get("transitional"),
    }


#: The transitional anatomies of style "bt", as (rib pairs, lumbar vertebrae): L5 sacralised,
#: S1 lumbarised (L6), 11 rib pairs with six vertebrae below them, 13 rib pairs with four
#: (each 24 presacral vertebrae or one fewer or more, ANATOMY.md); 11 and 13 rib pairs with
#: five lumbar vertebrae, whose counts from the ribs and the sacrum agree.
TRANSITIONAL_VARIANTS: tuple[tuple[int, int], ...] = (
    (12, 4),
    (12, 6),
    (11, 6),
    (13, 4),
    (11, 5),
    (13, 5),
)

#: The fields of view of style "bt", alternated: scans that hold the lower ribs and the
#: sacrum, so the anatomy could be seen by counting.
TRANSITIONAL_FOVS: tuple[str, ...] = ("abdomen_pelvis", "chest_abdomen_pelvis")


def transitional_spec(seed: int) -> StyleBSpec:
    """The style-B validation spec of ``seed`` with the transitional anatomy and the field
    of view of style "bt": the seed cycles through :data:`TRANSITIONAL_VARIANTS`, then
    through :data:`TRANSITIONAL_FOVS`."""
    from research.phantom_b import validation_spec

    ribs, lumbar = TRANSITIONAL_VARIANTS[seed % len(TRANSITIONAL_VARIANTS)]
    fov = TRANSITIONAL_FOVS[(seed // len(TRANSITIONAL_VARIANTS)) % len(TRANSITIONAL_FOVS)]
    return replace(validation_spec(seed), n_rib_pairs=ribs, n_lumbar=lumbar, fov=fov)


def _style_b_transitional(
    seed: int, pixel_mm: float | None = None
) -> tuple[CTVolume, dict[str, Any]]:
    return _style_b(seed, transitional_spec(seed), pixel_mm)


#: Phantom volume sources by style name: seed -> (volume, truth dict). "bt" is style B with
#: transitional anatomy only (:data:`TRANSITIONAL_VARIANTS`, :data:`TRANSITIONAL_FOVS`).
STYLES: dict[str, Callable[..., tuple[CTVolume, dict[str, Any]]]] = {
    "a": _style_a,
    "b": _style_b,
    "bt": _style_b_transitional,
}


#: The styles whose pixel size :func:`phantom_volumes` can change (style B's validation
#: spec draws 2.5 mm pixels, :func:`research.phantom_b.validation_spec`).
PIXEL_STYLES = ("b", "bt")


def phantom_volumes(
    style: str, seeds: range, pixel_mm: float | None = None
) -> Iterator[tuple[int, CTVolume, dict[str, Any]]]:
    """(seed, volume, truth) of each phantom of ``style`` ("a", "b" or "bt").

    ``pixel_mm`` renders style B at that in-plane pixel size (mm) instead of its
    validation spec's 2.5 mm, with the same field of view and the same anatomy
    (:func:`research.phantom_b.at_pixel_size`): scanners reconstruct abdomens at 0.6-1 mm.

    Raises
    ------
    ValueError
        Unknown style, or a pixel size for a style other than :data:`PIXEL_STYLES`.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}")
    if pixel_mm is not None and style not in PIXEL_STYLES:
        raise ValueError(f"a pixel size can be set for styles {PIXEL_STYLES} only, not {style!r}")
    for s in seeds:
        vol, truth = STYLES[style](s) if pixel_mm is None else STYLES[style](s, pixel_mm=pixel_mm)
        yield s, vol, truth


def evaluate_levels(
    style: str,
    seeds: range,
    config: LocatorConfig,
    device: str = "cpu",
    each: Callable[[LevelCase], None] | None = None,
) -> list[LevelCase]:
    """Locate L3 (with the configured verification) on each phantom volume of ``style``.

    Returns
    -------
    list of LevelCase, one per seed.
    """
    key = str(config.verify_weights)
    return compare_verification(style, seeds, config, [config.verify_weights], device, each)[key]


def compare_verification(
    style: str,
    seeds: range,
    config: LocatorConfig,
    verify_weights: Sequence[Path | None],
    device: str = "cpu",
    each: Callable[[LevelCase], None] | None = None,
    pixel_mm: float | None = None,
) -> dict[str, list[LevelCase]]:
    """The whole locator on each phantom of ``style`` once per level-verification network,
    on the same rendered volumes (a paired comparison: :func:`paired`).

    Parameters
    ----------
    verify_weights : weights files (None: without the verification); each replaces
        ``config.verify_weights`` for its run.
    pixel_mm : style B's in-plane pixel size (mm), see :func:`phantom_volumes`.

    Returns
    -------
    ``str(weights)`` -> one LevelCase per seed, in seed order.
    """
    from worker.locator.locate import locate_l3

    configs = {str(w): config.model_copy(update={"verify_weights": w}) for w in verify_weights}
    out: dict[str, list[LevelCase]] = {k: [] for k in configs}
    for s, vol, t in phantom_volumes(style, seeds, pixel_mm):
        for key, cfg in configs.items():
            res = locate_l3(vol, cfg, device=device)
            case = _level_case(f"{style}-{s}", t, res, vol.slice_spacing_mm)
            out[key].append(case)
            if each:
                each(case)
    return out


def _level_case(name: str, t: dict[str, Any], res: Any, slice_mm: float) -> LevelCase:
    """One LevelCase from a phantom's truth dict, :func:`locate_l3`'s result and the
    scan's slice spacing (mm)."""
    v = res.verification or {}
    final = None if res.slice_index is None else float(res.z_mm)
    before = v.get("locator_z_mm", final) if v else final
    return LevelCase(
        name=name,
        transitional=t["transitional"],
        truth_z_mm=float(t["mid"]) if t["in_fov"] else None,
        l3_range_mm=tuple(float(x) for x in t["range"]) if t["range"] else None,
        in_fov_said=res.in_field_of_view,
        locator_z_mm=None if before is None else float(before),
        final_z_mm=final,
        status=v.get("status"),
        counted_by=v.get("counted_by"),
        flagged_transitional=bool(v.get("possible_transitional_anatomy")),
        lumbar_counted=v.get("lumbar_counted"),
        seconds_verify=float(res.timings_s.get("verify", 0.0)),
        countable=t.get("countable"),
        flags=tuple(res.level_flags) + ((LOW_CONFIDENCE_FLAG,) if res.low_confidence else ()),
        confidence=float(res.confidence) if res.in_field_of_view else None,
        confidence_locator=float(v.get("confidence_locator", res.confidence))
        if res.in_field_of_view
        else None,
        confidence_raw=None if res.confidence_raw is None else float(res.confidence_raw),
        fine_correlation=None
        if not res.refinement or res.refinement.get("correlation") is None
        else float(res.refinement["correlation"]),
        l3_from_ribs_mm=_extent(v.get("l3_from_ribs_mm")),
        l3_from_sacrum_mm=_extent(v.get("l3_from_sacrum_mm")),
        ends_in_view=t.get("ends"),
        slice_mm=float(slice_mm),
    )


def _extent(v: Sequence[float] | None) -> tuple[float, float] | None:
    return None if v is None else (float(v[0]), float(v[1]))


def paired(first: list[LevelCase], second: list[LevelCase]) -> dict[str, Any]:
    """Scan by scan, where two runs on the same phantoms differ (within 10 mm after the
    verification, of the scans with L3 in the field of view that both answered).

    Only the discordant scans tell two networks apart: with ``only_first`` = b and
    ``only_second`` = c, ``mcnemar_p`` is the exact two-sided binomial p-value of b against
    c (McNemar's test; 1.0 when no scan differs), the chance of a split at least as uneven if
    the two were equally good.

    Raises
    ------
    ValueError
        The two lists are not of the same phantoms in the same order.
    """
    if [c.name for c in first] != [c.name for c in second]:
        raise ValueError("paired runs must hold the same phantoms in the same order")
    both = [
        (a, b)
        for a, b in zip(first, second, strict=True)
        if a.truth_z_mm is not None and a.final_z_mm is not None and b.final_z_mm is not None
    ]
    only_first = [
        a.name
        for a, b in both
        if within_10mm(a.error_after_mm) and not within_10mm(b.error_after_mm)
    ]
    only_second = [
        b.name
        for a, b in both
        if within_10mm(b.error_after_mm) and not within_10mm(a.error_after_mm)
    ]
    n = len(only_first) + len(only_second)
    p = 1.0
    if n:
        from scipy.stats import binomtest

        p = float(binomtest(len(only_first), n, 0.5).pvalue)
    return {
        "scans": len(both),
        "both_right": sum(
            1 for a, b in both if within_10mm(a.error_after_mm) and within_10mm(b.error_after_mm)
        ),
        "neither_right": sum(
            1
            for a, b in both
            if not within_10mm(a.error_after_mm) and not within_10mm(b.error_after_mm)
        ),
        "only_first": only_first,
        "only_second": only_second,
        "mcnemar_p": round(p, 4),
    }


def weights_sha256(config: LocatorConfig, verify_weights: Path | None) -> dict[str, str | None]:
    """SHA-256 of the first-stage, refinement and level-verification weights a run used:
    what an ``evaluate-levels --json`` file names, and what a level calibration fitted on it
    applies to."""
    from worker.locator.calibration import file_sha256

    return {
        "weights": file_sha256(config.weights),
        "refine_weights": None
        if config.refine_weights is None
        else file_sha256(config.refine_weights),
        "verify_weights": None if verify_weights is None else file_sha256(verify_weights),
    }


def within_10mm(error_mm: float | None) -> bool:
    """The answer is within :data:`research.evaluate_locator.SUCCESS_MM` (10 mm) of mid-L3
    (False when there is no answer or no mid-L3 in the scan)."""
    return error_mm is not None and error_mm <= SUCCESS_MM


def summarise(cases: list[LevelCase]) -> dict[str, Any]:
    """Within 10 mm before and after the verification (of the scans where both the truth and
    an answer exist), the verdicts, what the corrections did, transitional flags.

    ``within_10mm_of_countable`` is the issue's figure: of the scans where a radiologist
    could count to L3 (``LevelCase.countable``), the share answered within 10 mm, a "not in
    field of view" counting as a miss; ``l3_uncountable_said_not`` are right refusals in
    that sense (mid-L3 inside, but neither the last rib-bearing vertebra nor the sacrum).
    ``l3_absent_answered`` is the other way to be wrong: of the scans without mid-L3, the
    share given a slice (and ``l3_absent_answered_unflagged``, those answers without a QA
    flag).
    """
    both = [c for c in cases if c.truth_z_mm is not None and c.final_z_mm is not None]
    n = len(both)

    def share(pred: Callable[[LevelCase], bool], of: list[LevelCase]) -> str:
        k = sum(1 for c in of if pred(c))
        return f"{k}/{len(of)}" + (f" = {100.0 * k / len(of):.1f} %" if of else "")

    corrected = [c for c in both if c.status == "corrected"]
    countable = [c for c in cases if c.truth_z_mm is not None and c.countable]
    absent = [c for c in cases if c.truth_z_mm is None]
    trans = [c for c in both if c.transitional]
    trans_both = [c for c in trans if c.ends_in_view == "both"]
    by_variant: dict[str, list[LevelCase]] = {}
    for c in trans:
        by_variant.setdefault(str(c.transitional), []).append(c)

    def right_or_flagged(c: LevelCase) -> bool:
        return c.flagged_transitional or within_10mm(c.error_after_mm)

    typical = [c for c in both if not c.transitional]
    err_b = np.array([c.error_before_mm for c in both if c.error_before_mm is not None])
    err_a = np.array([c.error_after_mm for c in both], dtype=float)
    # every case in ``both`` has an error; cases from files without the slice spacing drop out
    err_slices = np.array([c.error_after_mm / c.slice_mm for c in both if c.slice_mm])
    return {
        "scans": len(cases),
        "l3_in_fov_and_answered": n,
        "l3_in_fov_said_not": sum(
            1 for c in cases if c.truth_z_mm is not None and not c.in_fov_said
        ),
        # the sense: "in the field of view" when a radiologist could count to L3
        "l3_countable": len(countable),
        "l3_countable_said_not": sum(1 for c in countable if not c.in_fov_said),
        "l3_uncountable_said_not": sum(
            1
            for c in cases
            if c.truth_z_mm is not None and c.countable is False and not c.in_fov_said
        ),
        "within_10mm_of_countable": share(lambda c: within_10mm(c.error_after_mm), countable),
        # a slice answered in a scan that does not hold mid-L3 is wrong whatever its z; the
        # share of such scans answered, and of those answers, the ones without a QA flag
        "l3_absent_answered": share(lambda c: c.final_z_mm is not None, absent),
        "l3_absent_answered_unflagged": share(
            lambda c: not c.flags, [c for c in absent if c.final_z_mm is not None]
        ),
        # clinical safety: an answer more than 10 mm off that carries no QA flag
        "wrong_and_unflagged": share(
            lambda c: not within_10mm(c.error_after_mm) and not c.flags, both
        ),
        "answers_flagged": share(lambda c: bool(c.flags), both),
        "flagged_that_are_wrong": share(
            lambda c: not within_10mm(c.error_after_mm), [c for c in both if c.flags]
        ),
        "within_10mm_before": share(lambda c: within_10mm(c.error_before_mm), both),
        "within_10mm_after": share(lambda c: within_10mm(c.error_after_mm), both),
        "mean_error_mm_before": round(float(err_b.mean()), 2) if err_b.size else None,
        "mean_error_mm_after": round(float(err_a.mean()), 2) if n else None,
        # the "mean <= 1 slice": each answer's error over its scan's slice spacing
        "mean_error_slices_after": round(float(err_slices.mean()), 2) if err_slices.size else None,
        "verdicts": {
            s: sum(1 for c in both if c.status == s)
            for s in ("confirmed", "corrected", "unverified", "counted")
        },
        "counted_by": {s: sum(1 for c in both if c.counted_by == s) for s in ("ribs", "sacrum")},
        "corrections_right": share(lambda c: within_10mm(c.error_after_mm), corrected),
        "corrections_that_broke_a_right_answer": sum(
            1
            for c in corrected
            if within_10mm(c.error_before_mm) and not within_10mm(c.error_after_mm)
        ),
        "found_by_counting_right": share(
            lambda c: within_10mm(c.error_after_mm), [c for c in both if c.status == "counted"]
        ),
        "typical_flagged_transitional": share(lambda c: c.flagged_transitional, typical),
        "transitional_flagged": share(lambda c: c.flagged_transitional, trans),
        "transitional_right_or_flagged": share(right_or_flagged, trans),
        # transitional anatomy can be seen by counting only where both ends are in view
        "transitional_both_ends_flagged": share(lambda c: c.flagged_transitional, trans_both),
        "transitional_both_ends_right_or_flagged": share(right_or_flagged, trans_both),
        "transitional_by_variant": {
            name: f"flagged {share(lambda c: c.flagged_transitional, of)}, right or flagged "
            f"{share(right_or_flagged, of)}"
            for name, of in sorted(by_variant.items())
        },
        "verify_seconds_mean": round(float(np.mean([c.seconds_verify for c in both])), 3)
        if n
        else None,
    }


def format_levels(name: str, summary: dict[str, Any]) -> str:
    """A Markdown table of :func:`summarise`'s figures."""
    lines = [f"| {name} | |", "|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k.replace('_', ' ')} | {v} |")
    return "\n".join(lines)
