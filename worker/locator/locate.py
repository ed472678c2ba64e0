"""The L3 locator's public entry: the first stage, then the refinement stage.

Belharbi et al. 2017, "Spotting L3 slice in CT scans using deep convolutional network and
transfer learning", sections 3.2-3.3 and Fig. 6.

Flow (one series): frontal MIPs at the pixel sizes the models were trained at, built from
one projection (:class:`worker.mip.FrontalMips`) -> first stage over the whole MIP
(:func:`worker.locator.coarse.coarse_stage`: windows, CNN, slope -1 correlation) -> is L3
in the field of view (:func:`worker.locator.coarse.in_field_of_view`) -> the best run and a
few next-best runs refined on the fine MIP (:func:`worker.locator.fine.choose_run`) -> z (mm)
-> nearest real slice.

Modules, in dependency order (no circle): ``model`` (networks) and ``windows`` (geometry,
input strip) -> ``decision`` (numpy) and ``weights`` (file format, loading) -> ``coarse``
and ``fine`` (the two stages; neither imports the other) -> ``locate`` (this module), which
also applies ``calibration`` (raw confidence -> P(within 10 mm) and the flag threshold, read
from beside the first-stage weights; numpy only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import LocatorConfig
from core.errors import AnalysisError
from worker.locator.calibration import (
    Calibration,
    LevelCalibration,
    load_calibration,
    load_level_calibration,
    verdict_of,
)
from worker.locator.coarse import coarse_stage, in_field_of_view
from worker.locator.decision import Decision
from worker.locator.fine import check_fine_locator, choose_run
from worker.locator.weights import LoadedLocator, LocatorWeightsError, load_locator
from worker.mip import FrontalMips, Mip
from worker.volume.load import CTVolume

#: With a refinement stage, this many next-best first-stage runs at other places are
#: refined too, and the fine stage's agreement arbitrates (:func:`worker.locator.fine.choose_run`).
REFINE_ALTERNATIVES = 2

#: Flag threshold on the raw confidence when the locator has no calibration and
#: ``locator.min_confidence`` is not set (the threshold before calibration existed).
RAW_FLAG_THRESHOLD = 0.5


@dataclass
class L3Location:
    """Where L3 is, or why it was not found.

    Attributes
    ----------
    in_field_of_view : False when L3 is not inside the scanned range (then no slice).
    slice_index : 0-based index of the L3 slice in the series sorted by ascending z
        (``CTVolume.z_mm``), or None.
    z_mm : z position (mm) of the L3 decision, or None.
    mip_row : fractional MIP row of the decision, or None.
    confidence : 0..1. With a calibration (:mod:`worker.locator.calibration`) and a slice
        answer: the probability that the answer is within 10 mm of the true mid-L3,
        calibrated on validation phantoms; otherwise the raw confidence.
    reason : why ``in_field_of_view`` is False or the confidence is low; None otherwise.
    window_top_rows : (n_windows,) int, MIP row of each window's top edge.
    predictions : (n_windows,) float32, predicted L3 offset (MIP rows) inside each window.
    correlation : (n_candidates,) float32, correlation with the ideal slope -1 line for each
        candidate L3 row in ``candidate_rows``.
    candidate_rows : (n_candidates,) float, MIP rows the correlation was evaluated at.
    presence : (n_windows,) float32, probability that L3 lies within +/- a of each window's
        centre (l3spot's second head; empty for a paper-only model).
    window_height_px : window height H in MIP rows (for plots).
    timings_s : seconds spent per step ("mip", "windows", "cnn", "decision", "refine");
        "mip" is the time :func:`locate_l3` spent building MIPs (0 when the caller built
        them, as the pipeline does).
    model : architecture and weights file the decision came from.
    refinement : the second (fine) stage's report (:class:`worker.locator.fine.Refinement`
        summary) when one ran; ``z_mm``/``slice_index``/``mip_row`` are then the refined
        answer and ``refinement["start_z_mm"]`` the first stage's.
    confidence_raw : the raw confidence ``corr**2 * agreement * presence`` of the chosen
        first-stage run (:func:`worker.locator.decision.decide_l3`).
    confidence_calibrated : whether ``confidence`` is the calibrated probability.
    flag_below : the threshold ``low_confidence`` compares ``confidence`` with.
    verification : the level verification's report
        (:meth:`worker.locator.vertebrae.LevelVerification.summary`) when it ran; with status
        "corrected" and ``locator.verify_mode`` "correct", ``z_mm``/``slice_index``/
        ``mip_row`` are the counted L3 and ``verification["locator_z_mm"]`` the locator's.
    confidence_parts : the chosen first-stage run's ``correlation``, ``agreement`` and
        ``presence`` (None without a presence head), whose product is the raw confidence
        (:class:`worker.locator.decision.Decision`).
    """

    in_field_of_view: bool
    slice_index: int | None
    z_mm: float | None
    mip_row: float | None
    confidence: float
    reason: str | None = None
    window_top_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    correlation: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    candidate_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    presence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    window_height_px: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    model: str = ""
    refinement: dict[str, Any] | None = None
    confidence_parts: dict[str, float | None] = field(default_factory=dict)
    confidence_raw: float | None = None
    confidence_calibrated: bool = False
    flag_below: float = 0.0
    verification: dict[str, Any] | None = None

    @property
    def level_flags(self) -> list[str]:
        """QA flags of the level verification: ``possible_transitional_anatomy``, and
        ``l3_level_corrected`` (the counted L3 replaced the locator's) or
        ``l3_level_disagrees`` (``locator.verify_mode`` "flag": the locator's was kept), or
        ``l3_level_unverified`` (no trusted count: the locator's answer stands unchecked;
        such answers were wrong in 6 of 15 on style A and B, models/spine_fcn.md), or
        ``l3_found_by_counting``."""
        v = self.verification
        if not v or not self.in_field_of_view:
            return []
        flags = ["possible_transitional_anatomy"] if v.get("possible_transitional_anatomy") else []
        if v.get("status") == "corrected":
            flags.append("l3_level_corrected" if v.get("applied") else "l3_level_disagrees")
        if v.get("status") == "unverified":
            flags.append("l3_level_unverified")
        if v.get("status") == "counted":
            flags.append("l3_found_by_counting")
        return flags

    @property
    def low_confidence(self) -> bool:
        """L3 answered with ``confidence`` below ``flag_below``: the ``low_l3_confidence``
        QA flag (:data:`worker.pipeline.LOW_CONFIDENCE_FLAG`)."""
        return self.in_field_of_view and self.confidence < self.flag_below

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict of the decision (without the per-window arrays)."""
        return {
            "in_field_of_view": self.in_field_of_view,
            "slice_index": self.slice_index,
            "z_mm": None if self.z_mm is None else round(float(self.z_mm), 2),
            "mip_row": None if self.mip_row is None else round(float(self.mip_row), 2),
            "confidence": round(float(self.confidence), 4),
            "confidence_raw": None
            if self.confidence_raw is None
            else round(float(self.confidence_raw), 4),
            "confidence_calibrated": self.confidence_calibrated,
            "flag_below": round(float(self.flag_below), 4),
            "reason": self.reason,
            "n_windows": int(len(self.predictions)),
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "model": self.model,
            "refinement": self.refinement,
            "confidence_parts": self.confidence_parts,
            "verification": self.verification,
        }


@dataclass(frozen=True)
class LocatorStages:
    """The loaded locator models of one configuration.

    Attributes
    ----------
    coarse : the first-stage locator (``locator.weights``).
    fine : the refinement-stage locator (``locator.refine_weights``), or None.
    calibration : the confidence calibration of exactly these weights, or None (raw
        confidence; :func:`worker.locator.calibration.load_calibration`).
    """

    coarse: LoadedLocator
    fine: LoadedLocator | None = None
    calibration: Calibration | None = None

    @property
    def pixel_sizes(self) -> tuple[float, ...]:
        """MIP pixel sizes (mm) the models were trained at: the first stage's first."""
        sizes = [self.coarse.spec.pixel_mm]
        if self.fine is not None:
            sizes.append(self.fine.spec.pixel_mm)
        return tuple(dict.fromkeys(sizes))


def load_stages(
    config: LocatorConfig, device: str = "auto", series_instance_uid: str = ""
) -> LocatorStages:
    """Load (cached per file version and device) the locator models a configuration names.

    Parameters
    ----------
    config : ``weights`` (first stage) and ``refine_weights`` (refinement stage or None).
    device : "auto", "cpu", "cuda" or "cuda:N".
    series_instance_uid : the series being analysed, for the error message.

    Returns
    -------
    LocatorStages
        Their window geometries (``spec.pixel_mm``) decide which MIPs an analysis builds.
        ``calibration`` is read from beside the first-stage weights (None, with a warning
        logged once, when it is missing or was fitted with other weights).

    Raises
    ------
    AnalysisError
        (stage "locator") A weights file is missing, unreadable or not a locator, the
        refinement weights are not a refinement-stage model, or CUDA was asked for and is
        not available: a misconfiguration fails every series, at once.
    """
    try:
        coarse = load_locator(config.weights, device)
        fine = None
        if config.refine_weights is not None:
            fine = load_locator(config.refine_weights, device)
            check_fine_locator(fine)
    except LocatorWeightsError as exc:
        raise AnalysisError(series_instance_uid, "locator", str(exc)) from exc
    calibration = load_calibration(coarse.path, None if fine is None else fine.path)
    return LocatorStages(coarse, fine, calibration)


def flag_threshold(
    min_confidence: float | None, calibration: Calibration | LevelCalibration | None
) -> float:
    """The ``low_l3_confidence`` threshold on the reported confidence.

    Parameters
    ----------
    min_confidence : ``locator.min_confidence``; a number is used as it is (on the
        calibrated probability when there is a calibration, else on the raw score).
    calibration : the locator's calibration, the level calibration, or None.

    Returns
    -------
    float
        ``min_confidence`` when set; else the calibration's ``flag_below`` (chosen on
        validation phantoms, models/locator_cnn4.md); else :data:`RAW_FLAG_THRESHOLD`.
    """
    if min_confidence is not None:
        return float(min_confidence)
    if calibration is not None:
        return float(calibration.flag_below)
    return RAW_FLAG_THRESHOLD


def _confidence_parts(d: Decision) -> dict[str, float | None]:
    return {
        "correlation": round(d.correlation_peak, 4),
        "agreement": round(d.agreement, 4),
        "presence": None if d.presence is None else round(d.presence, 4),
    }


def locate_in_mip(
    mip: Mip,
    loc: LoadedLocator,
    stride_px: int = 4,
    batch_size: int = 64,
    min_confidence: float | None = None,
    fine: tuple[Mip, LoadedLocator] | None = None,
    refine_stride_px: int = 2,
    calibration: Calibration | None = None,
) -> L3Location:
    """Run both locator stages on frontal MIPs already at the models' pixel sizes.

    Parameters
    ----------
    mip : frontal MIP (rows, cols) in HU at ``loc.spec.pixel_mm`` (row 0 = most superior).
    loc : the first-stage locator.
    stride_px, batch_size : first-stage window stride (MIP rows) and windows per pass.
    min_confidence : flag threshold on the reported confidence; None = the calibration's
        (:func:`flag_threshold`). Below it the result carries a "low confidence" reason and
        ``low_confidence`` is True.
    fine : (frontal MIP at the fine model's pixel size, refinement-stage locator): when
        given and L3 is in the field of view, the best run and up to
        :data:`REFINE_ALTERNATIVES` next-best runs elsewhere are refined and
        :func:`worker.locator.fine.choose_run` picks one (``refinement`` in the result).
    refine_stride_px : step between fine window centres (fine MIP rows).
    calibration : maps the raw confidence of a slice answer to P(within 10 mm); None =
        report the raw confidence. A "not in field of view" result keeps the raw score of
        its best run (there is no answer whose error a probability could describe).

    Returns
    -------
    L3Location
        ``slice_index`` is the nearest source slice (``mip.slice_z_mm``); see
        :func:`locate_l3`. ``timings_s`` has no "mip" entry here.

    Raises
    ------
    ValueError
        A MIP's pixel size differs from its model's.
    """
    spec = loc.spec
    n_alt = REFINE_ALTERNATIVES if fine is not None else 0
    first = coarse_stage(mip, loc, stride_px, batch_size, n_alternatives=n_alt)
    d = first.decision
    timings = dict(first.timings_s)
    common: dict[str, Any] = {
        "window_top_rows": first.window_top_rows,
        "predictions": first.predictions,
        "correlation": d.correlation,
        "candidate_rows": d.candidate_rows,
        "presence": np.zeros(0, np.float32) if first.presence is None else first.presence,
        "window_height_px": spec.height_px,
        "timings_s": timings,
        "model": f"{loc.arch}:{loc.path.name}",
    }
    threshold = flag_threshold(min_confidence, calibration)
    common["flag_below"] = threshold
    in_fov, why = in_field_of_view(d, mip)
    if not in_fov:
        return L3Location(
            False,
            None,
            None,
            None,
            d.confidence,
            reason=why,
            confidence_parts=_confidence_parts(d),
            confidence_raw=d.confidence,
            **common,
        )
    refinement = None
    if fine is None:
        z = float(mip.row_to_z(d.row))
    else:
        t4 = time.perf_counter()
        candidates = [d] + [c for c in d.alternatives if in_field_of_view(c, mip)[0]]
        d, ref = choose_run(candidates, mip, fine[0], fine[1], refine_stride_px, batch_size)
        timings["refine"] = time.perf_counter() - t4
        z, refinement = ref.z_mm, ref.summary()
        refinement["model"] = f"{fine[1].arch}:{fine[1].path.name}"
        refinement["candidates"] = len(candidates)
        refinement["first_stage_choice_kept"] = d is candidates[0]
    row = float(mip.z_to_row(z))
    conf = d.confidence
    if calibration is not None:
        fine_corr = None if refinement is None else float(refinement["correlation"])
        conf = calibration.probability(d.confidence, fine_corr)
    reason = _low_confidence_reason(conf, threshold, calibration is not None)
    return L3Location(
        True,
        mip.row_to_slice_index(row),
        z,
        row,
        conf,
        reason=reason,
        refinement=refinement,
        confidence_parts=_confidence_parts(d),
        confidence_raw=d.confidence,
        confidence_calibrated=calibration is not None,
        **common,
    )


def _low_confidence_reason(confidence: float, threshold: float, calibrated: bool) -> str | None:
    """The answer's reason when its confidence is below the flag threshold, else None."""
    if confidence >= threshold:
        return None
    what = "P(within 10 mm)" if calibrated else "confidence"
    return f"low {what} ({confidence:.2f} < {threshold:.2f}); check the L3 slice"


def locate_l3(
    volume: CTVolume,
    config: LocatorConfig,
    mips: FrontalMips | None = None,
    *,
    device: str = "auto",
) -> L3Location:
    """Find the L3 slice of a CT volume (Belharbi et al. 2017, sections 3.2-3.3, Fig. 6).

    Parameters
    ----------
    volume : the CT volume ((z, y, x) HU, ``z_mm`` ascending).
    config : locator settings (weights, stride, batch size, minimum confidence).
    mips : the frontal MIPs of ``volume`` (:class:`worker.mip.FrontalMips`) when the caller
        has them (the pipeline builds them once per analysis, also for the overview); else
        built here. Either way each MIP is at the pixel size its model was trained at
        (``WindowSpec.pixel_mm`` in the weights file) and comes from one projection.
    device : "auto", "cpu" or "cuda".

    Returns
    -------
    L3Location
        ``slice_index`` indexes ``volume.z_mm`` (nearest real slice to the decided z);
        ``in_field_of_view=False`` with ``slice_index=None`` and a ``reason`` when L3 is not
        inside the scanned range. Never a guess.

    Raises
    ------
    AnalysisError
        The weights cannot be loaded (missing/corrupt) or the volume is unusable; carries
        the Series Instance UID.
    ValueError
        ``mips`` belongs to another volume.
    """
    uid = volume.series_instance_uid
    stages = load_stages(config, device, uid)
    if mips is None:
        mips = FrontalMips(volume)
    elif mips.volume is not volume:
        raise ValueError("the frontal MIPs passed to locate_l3 are of another volume")
    t0 = time.perf_counter()
    try:
        mip = mips.at(stages.coarse.spec.pixel_mm)
    except ValueError as exc:
        raise AnalysisError(uid, "locator", f"cannot build the frontal MIP: {exc}") from exc
    fine = None
    if stages.fine is not None:
        try:
            fine = (mips.at(stages.fine.spec.pixel_mm), stages.fine)
        except ValueError as exc:
            raise AnalysisError(uid, "locator", f"cannot build the fine MIP: {exc}") from exc
    t_mip = time.perf_counter() - t0
    result = locate_in_mip(
        mip,
        stages.coarse,
        config.stride_px,
        config.batch_size,
        config.min_confidence,
        fine,
        config.refine_stride_px,
        stages.calibration,
    )
    if result.z_mm is not None:
        result.slice_index = volume.nearest_slice(result.z_mm)
    result.timings_s = {"mip": t_mip, **result.timings_s}
    if config.verify_weights and (result.in_field_of_view or config.count_when_absent):
        t1 = time.perf_counter()
        verify(volume, result, mip, config)
        result.timings_s["verify"] = time.perf_counter() - t1
    return result


def verify(volume: CTVolume, result: L3Location, mip: Mip, config: LocatorConfig) -> None:
    """Count the vertebrae around ``result`` and record (or apply) the verdict in place.

    :func:`worker.locator.vertebrae.verify_in_volume` on ``locator.verify_weights``; with
    ``locator.verify_mode`` "correct" a "corrected" verdict moves ``z_mm``, ``slice_index``
    and ``mip_row`` to the counted L3 and says so in ``reason``, and a "confirmed" one moves
    them to the middle of the L3 body it confirmed (the locator's slice lay within that
    level; ``verification["locator_z_mm"]`` keeps it). A "not in the field of
    view" answer is searched by counting over the scan
    (:func:`worker.locator.vertebrae.find_by_counting`) when ``locator.count_when_absent``;
    an L3 found so becomes the answer (status "counted", the ``l3_found_by_counting`` flag),
    its confidence the locator's raw score (which raises ``low_l3_confidence`` too).

    Raises
    ------
    AnalysisError
        (stage "locator") The verification weights are missing or unreadable: a
        misconfiguration fails every series, at once.
    """
    from worker.locator.vertebrae import (
        VerificationError,
        find_by_counting,
        load_spine_model,
        verify_in_volume,
    )

    if not result.in_field_of_view and not config.count_when_absent:
        return
    uid = volume.series_instance_uid
    try:
        net = load_spine_model(config.verify_weights)
    except VerificationError as exc:
        raise AnalysisError(uid, "locator", str(exc)) from exc
    spacing = (float(volume.pixel_spacing_mm[0]), float(volume.pixel_spacing_mm[1]))
    model = Path(config.verify_weights).name
    if not result.in_field_of_view:
        found = find_by_counting(net, volume.hu, volume.z_mm, spacing)
        if found is None:
            return
        result.verification = {**found.summary(), "model": model}
        result.in_field_of_view = True
        _move_answer(volume, result, mip, found.z_mm)
        result.reason = (
            f"L3 found by counting vertebrae from {_counted_from(found.counted_by)}; the "
            f"locator said: {result.reason}; check the level"
        )
        _calibrate_on_verdict(result, config)
        return
    v = verify_in_volume(net, volume.hu, volume.z_mm, spacing, float(result.z_mm))
    # "correct" mode measures at the counted L3 body's middle: another level's (corrected,
    # ``applied``) or, within the locator's level, its own (confirmed)
    moved = config.verify_mode == "correct" and v.status in ("confirmed", "corrected")
    applied = moved and v.status == "corrected"
    result.verification = {**v.summary(), "model": model, "applied": applied}
    if moved:
        _move_answer(volume, result, mip, v.z_mm)
    if applied:
        result.reason = (
            f"L3 level corrected by counting vertebrae from {_counted_from(v.counted_by)} "
            f"({v.locator_z_mm:.0f} -> {v.z_mm:.0f} mm); check the level"
        )
    _calibrate_on_verdict(result, config)


def _calibrate_on_verdict(result: L3Location, config: LocatorConfig) -> None:
    """Replace the answer's confidence by P(within 10 mm) given the verification's verdict
    (:class:`worker.locator.calibration.LevelCalibration`, beside the verification weights),
    in place; the first stage's is kept as ``verification["confidence_locator"]``.

    Without a level calibration for these weights, or for a verdict it has no map of, the
    answer keeps the first stage's confidence and threshold. A reason the verification set
    (a corrected or counted level) is kept; otherwise the reason is the low-confidence one
    or None.
    """
    if result.verification is None or result.confidence_raw is None:
        return
    cal = load_level_calibration(config.verify_weights, config.weights, config.refine_weights)
    if cal is None:
        return
    fine = result.refinement.get("correlation") if result.refinement else None
    p = cal.probability(
        verdict_of(result.verification),
        result.confidence_raw,
        None if fine is None else float(fine),
    )
    if p is None:
        return
    result.verification["confidence_locator"] = round(float(result.confidence), 4)
    result.confidence = p
    result.confidence_calibrated = True
    result.flag_below = flag_threshold(config.min_confidence, cal)
    if result.verification.get("status") in ("confirmed", "unverified"):
        result.reason = _low_confidence_reason(p, result.flag_below, True)


def _counted_from(counted_by: str | None) -> str:
    return "the last rib-bearing vertebra" if counted_by == "ribs" else "the sacrum"


def _move_answer(volume: CTVolume, result: L3Location, mip: Mip, z_mm: float) -> None:
    """Put the answer of ``result`` at ``z_mm``: z, nearest slice and MIP row."""
    result.z_mm = z_mm
    result.slice_index = volume.nearest_slice(z_mm)
    result.mip_row = float(mip.z_to_row(z_mm))
