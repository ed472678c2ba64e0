"""Body composition at L3: SMA, IMAT, VAT and SAT segmented and measured.

HU ranges: skeletal muscle -29..+150 HU, adipose tissue -190..-30 HU (Mitsiopoulos et al.
1998). Skeletal muscle index SMI = SMA / height^2 (cm^2/m^2); sarcopenia cut-offs from Prado
et al. 2008 or Martin et al. 2013.

Two segmenters share one interface (:func:`segment_slice`): the classical method, named
steps over one slice state in :mod:`worker.composition.classical` (body mask, HU ranges,
the abdominal wall found by ray casting as the SAT/VAT boundary, vertebra, psoas beside it,
IMAT, bowel contents; every threshold in ``CompositionConfig.classical``), and the 2-D U-Net
of :mod:`worker.composition.unet`. ``CompositionConfig.method`` chooses; the measurements in
``docs/composition.md`` decided the default.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from core import labels as lab
from core.config import CompositionConfig
from core.errors import AnalysisError
from core.logs import log_event
from worker.composition.body import body_mask
from worker.composition.bone import TrabecularAttenuation, measure_trabecular_attenuation
from worker.composition.classical import DEFAULT_RULES, Rules, label_map, run_steps
from worker.composition.hu import denoise_slice, in_hu_range, noise_sd
from worker.volume.load import CTVolume, PatientInfo

__all__ = [
    "CompositionResult",
    "SarcopeniaResult",
    "SliceSegmentation",
    "TissueMeasure",
    "body_mass_index",
    "denoise_slice",
    "in_hu_range",
    "measure_composition",
    "measure_labels",
    "noise_sd",
    "qa_flags",
    "sarcopenia",
    "segment_classical",
    "segment_slice",
    "skeletal_muscle_index",
]

logger = logging.getLogger(__name__)

#: Prado et al. 2008 (Lancet Oncol 9:629): sarcopenia if SMI (cm^2/m^2) below.
PRADO_2008_CM2_PER_M2 = {"M": 52.4, "F": 38.5}
#: Martin et al. 2013 (J Clin Oncol 31:1539): men 43 (BMI < 25) or 53 (BMI >= 25), women 41.
MARTIN_2013_MEN_BMI_LT25 = 43.0
MARTIN_2013_MEN_BMI_GE25 = 53.0
MARTIN_2013_WOMEN = 41.0
#: BMI boundary (kg/m^2) of Martin et al. 2013 (WHO overweight threshold).
MARTIN_2013_BMI_SPLIT = 25.0


@dataclass(frozen=True)
class TissueMeasure:
    """One compartment on the L3 slice: area (cm^2) and radiodensity (HU)."""

    area_cm2: float
    mean_hu: float | None
    sd_hu: float | None
    pixel_count: int


@dataclass(frozen=True)
class SarcopeniaResult:
    """Sarcopenia evaluation; ``flag`` is None with a ``reason`` when it cannot be decided."""

    cutoffs: str  # "prado2008" | "martin2013"
    flag: bool | None
    threshold_cm2_per_m2: float | None = None
    reason: str | None = None


@dataclass
class CompositionResult:
    """Segmentation and measurements on the L3 slice.

    Attributes
    ----------
    slice_index : the measured slice (index into ``CTVolume.z_mm``).
    labels : (y, x) uint8 label map on the source pixel grid of that slice, values from
        :mod:`core.labels` (0 background, 1 SMA, 2 IMAT, 3 VAT, 4 SAT).
    measures : compartment key ("sma", "imat", "vat", "sat") -> :class:`TissueMeasure`.
    smi_cm2_per_m2 : SMA / PatientSize^2, or None (see ``smi_reason``).
    smi_reason : why SMI is None.
    sarcopenia : evaluation with the configured cut-offs.
    bmi_kg_per_m2 : from PatientWeight and PatientSize when both are present.
    qa_flags : e.g. "body_truncated", "arms_in_slice", "metal_artefact", "unusual_muscle_hu".
    method : "classical" or "unet".
    slices_averaged : indices of the slices whose measures were averaged (L3 +/- neighbour_mm).
    trabecular : the L3 vertebral body's trabecular attenuation
        (:func:`worker.composition.bone.measure_trabecular_attenuation`), or None when not
        computed.
    """

    slice_index: int
    labels: np.ndarray
    measures: dict[str, TissueMeasure]
    smi_cm2_per_m2: float | None
    smi_reason: str | None
    sarcopenia: SarcopeniaResult | None
    bmi_kg_per_m2: float | None = None
    qa_flags: list[str] = field(default_factory=list)
    method: str = "classical"
    slices_averaged: list[int] = field(default_factory=list)
    trabecular: TrabecularAttenuation | None = None

    def on_grid(self, to_grid: Callable[[np.ndarray], np.ndarray]) -> CompositionResult:
        """The same result with its (y, x) masks (``labels``, the trabecular ROI) mapped by
        ``to_grid`` (e.g. :meth:`worker.volume.orientation.InPlane.to_source`: from the
        canonical grid to the stored pixels the SEG and the SR refer to)."""
        trab = self.trabecular
        if trab is not None and trab.roi is not None:
            trab = dataclasses.replace(trab, roi=np.asarray(to_grid(trab.roi)))
        return dataclasses.replace(self, labels=to_grid(self.labels), trabecular=trab)


@dataclass
class SliceSegmentation:
    """Output of a segmenter on one slice.

    Attributes
    ----------
    labels : (y, x) uint8 label map (values from :mod:`core.labels`).
    body : (y, x) bool trunk mask (arms and table excluded).
    qa_flags : flags the segmenter itself can raise ("body_truncated", "arms_in_slice").
    wall : (y, x) bool region inside the abdominal wall fascia (SAT/VAT boundary), or None.
    """

    labels: np.ndarray
    body: np.ndarray
    qa_flags: list[str] = field(default_factory=list)
    wall: np.ndarray | None = None


# --------------------------------------------------------------------------------------
# classical segmentation (worker.composition.classical)
# --------------------------------------------------------------------------------------


def segment_classical(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
    rules: Rules = DEFAULT_RULES,
) -> SliceSegmentation:
    """Classical (threshold + anatomy) segmentation of an axial slice at L3.

    Parameters
    ----------
    hu : (y, x) float array, HU; y anterior->posterior, x patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    config : HU ranges (Mitsiopoulos et al. 1998 by default) and ``classical`` parameters.
    rules : the replaceable anatomical rules (:class:`worker.composition.classical.Rules`).

    Returns
    -------
    :class:`SliceSegmentation` with labels SMA / IMAT / VAT / SAT on the source grid.

    Notes
    -----
    The named steps of :mod:`worker.composition.classical`: body, denoising, tissue by HU,
    wall, vertebra, wall muscles, psoas, IMAT, bowel contents and the VAT/SAT split.
    """
    state = run_steps(hu, spacing_mm, config, rules)
    wall = state.inner_closed if state.inner_closed is not None else state.inner
    return SliceSegmentation(label_map(state), state.body, list(state.flags), wall=wall)


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


def measure_labels(
    labels: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, float]
) -> dict[str, TissueMeasure]:
    """Area (cm^2), mean and SD HU of each compartment of a label map.

    Parameters
    ----------
    labels : (y, x) uint8 label map (values from :mod:`core.labels`).
    hu : (y, x) HU slice on the same grid.
    spacing_mm : (dy, dx) PixelSpacing in mm; area = count x dy x dx / 100 cm^2.

    Returns
    -------
    compartment key -> :class:`TissueMeasure` (mean/sd None for an empty compartment;
    SD is the population SD).
    """
    pix_cm2 = float(spacing_mm[0]) * float(spacing_mm[1]) / 100.0
    out: dict[str, TissueMeasure] = {}
    for value, key in lab.COMPARTMENTS.items():
        vals = hu[labels == value]
        n = int(vals.size)
        out[key] = TissueMeasure(
            area_cm2=n * pix_cm2,
            mean_hu=float(vals.mean()) if n else None,
            sd_hu=float(vals.std()) if n else None,
            pixel_count=n,
        )
    return out


def _average_measures(per_slice: list[dict[str, TissueMeasure]]) -> dict[str, TissueMeasure]:
    """Mean area over slices; HU pooled over all pixels of all slices."""
    out: dict[str, TissueMeasure] = {}
    for key in lab.COMPARTMENTS.values():
        ms = [m[key] for m in per_slice]
        n_tot = sum(m.pixel_count for m in ms)
        area = float(np.mean([m.area_cm2 for m in ms]))
        if n_tot:
            mean = sum(m.pixel_count * (m.mean_hu or 0.0) for m in ms) / n_tot
            ex2 = sum(m.pixel_count * ((m.sd_hu or 0.0) ** 2 + (m.mean_hu or 0.0) ** 2) for m in ms)
            sd = float(np.sqrt(max(ex2 / n_tot - mean * mean, 0.0)))
        else:
            mean, sd = None, None
        out[key] = TissueMeasure(
            area_cm2=area,
            mean_hu=mean,
            sd_hu=sd,
            pixel_count=int(round(n_tot / len(ms))),
        )
    return out


def skeletal_muscle_index(sma_cm2: float, patient: PatientInfo) -> tuple[float | None, str | None]:
    """SMI = SMA / height^2 (cm^2/m^2), or (None, reason) when PatientSize is missing.

    Parameters
    ----------
    sma_cm2 : skeletal muscle area at L3 in cm^2.
    patient : PatientSize (0010,1020) in metres is used.
    """
    h = patient.size_m
    if h is None or not np.isfinite(h) or h <= 0:
        return None, "PatientSize (0010,1020) missing: SMI needs the height"
    if not 0.5 <= h <= 2.6:
        # the value is patient data: the reason (shown on the web page) names the attribute
        return None, "PatientSize (0010,1020) outside 0.5..2.6 m (not metres?): SMI not computed"
    return sma_cm2 / (h * h), None


def body_mass_index(patient: PatientInfo) -> float | None:
    """BMI = PatientWeight / PatientSize^2 (kg/m^2), or None if either is missing."""
    h, w = patient.size_m, patient.weight_kg
    if h is None or w is None or h <= 0 or w <= 0:
        return None
    return w / (h * h)


def sarcopenia(
    smi: float | None, patient: PatientInfo, cutoffs: str, bmi: float | None
) -> SarcopeniaResult:
    """Sarcopenia flag with published SMI cut-offs; None with a reason, never a guess.

    Parameters
    ----------
    smi : skeletal muscle index (cm^2/m^2) or None.
    patient : PatientSex (0010,0040) "M"/"F" is needed.
    cutoffs : "prado2008" (Prado et al. 2008: < 52.4 men, < 38.5 women) or "martin2013"
        (Martin et al. 2013: men < 43 if BMI < 25 else < 53; women < 41).
    bmi : kg/m^2, needed for men with "martin2013".
    """
    sex = (patient.sex or "").upper()
    if smi is None:
        return SarcopeniaResult(cutoffs, None, None, "SMI not available (PatientSize missing)")
    if sex not in ("M", "F"):
        return SarcopeniaResult(
            cutoffs, None, None, "PatientSex missing or not M/F: sex-specific cut-off unknown"
        )
    if cutoffs == "prado2008":
        thr = PRADO_2008_CM2_PER_M2[sex]
    elif cutoffs == "martin2013":
        if sex == "F":
            thr = MARTIN_2013_WOMEN
        elif bmi is None:
            return SarcopeniaResult(
                cutoffs, None, None, "PatientWeight missing: Martin 2013 cut-off for men needs BMI"
            )
        else:
            thr = (
                MARTIN_2013_MEN_BMI_LT25
                if bmi < MARTIN_2013_BMI_SPLIT
                else MARTIN_2013_MEN_BMI_GE25
            )
    else:
        return SarcopeniaResult(cutoffs, None, None, f"unknown cut-off set {cutoffs!r}")
    return SarcopeniaResult(cutoffs, bool(smi < thr), thr, None)


def qa_flags(
    hu: np.ndarray,
    labels: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
) -> list[str]:
    """QA flags from the image and the segmentation (the segmenter adds its own).

    "metal_artefact": area of pixels > ``metal_hu`` (2000 HU) inside the body of at least
    ``metal_min_area_mm2``; "unusual_muscle_hu": SMA mean outside ``muscle_mean_hu_qa``
    (-20..80 HU) or no muscle found.
    """
    flags: list[str] = []
    pix_mm2 = spacing_mm[0] * spacing_mm[1]
    region = ndimage.binary_dilation(body, iterations=2) if body.any() else np.ones_like(body)
    if ((hu > config.metal_hu) & region).sum() * pix_mm2 >= config.metal_min_area_mm2:
        flags.append("metal_artefact")
    m = hu[labels == lab.SMA]
    lo, hi = config.muscle_mean_hu_qa
    if m.size == 0 or not lo <= float(m.mean()) <= hi:
        flags.append("unusual_muscle_hu")
    return flags


def segment_slice(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
    *,
    device: str = "auto",
    series_uid: str = "",
) -> SliceSegmentation:
    """Segment one axial slice with the configured method ("classical" or "unet").

    Parameters
    ----------
    hu : (y, x) HU slice; y anterior->posterior, x patient right->left.
    spacing_mm : (dy, dx) in mm.
    config : ``method`` chooses; ``unet_weights`` for the U-Net.
    device : torch device for the U-Net ("auto", "cpu", "cuda").
    series_uid : for error messages.

    Raises
    ------
    AnalysisError
        The U-Net is configured but its weights are missing or unreadable.
    """
    if config.method == "classical":
        return segment_classical(hu, spacing_mm, config)
    from worker.composition import unet as seg_unet

    body, flags = body_mask(np.asarray(hu, np.float32), spacing_mm, config.classical)
    try:
        labels = seg_unet.predict_labels(hu, spacing_mm, config, device=device)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise AnalysisError(series_uid, "composition", f"U-Net unavailable: {exc}") from exc
    # The network proposes compartments; the tissue itself is defined by HU (Mitsiopoulos
    # et al. 1998), as in the classical method: gas, bone or contrast never count.
    hu_arr = np.asarray(hu, np.float32)
    muscle = in_hu_range(hu_arr, config.muscle_hu)
    fat = in_hu_range(hu_arr, config.fat_hu)
    is_fat_label = np.isin(labels, (lab.IMAT, lab.VAT, lab.SAT))
    keep = body & (((labels == lab.SMA) & muscle) | (is_fat_label & fat))
    labels = np.where(keep, labels, 0).astype(np.uint8)
    return SliceSegmentation(labels, body, flags)


def measure_composition(
    volume: CTVolume, slice_index: int, config: CompositionConfig, *, device: str = "auto"
) -> CompositionResult:
    """Segment and measure body composition on the L3 slice.

    Parameters
    ----------
    volume : the CT series (``hu`` (z, y, x), ``pixel_spacing_mm`` (dy, dx) mm, patient).
    slice_index : index of the L3 slice into ``volume.z_mm``.
    config : HU ranges, method, cut-offs, ``neighbour_mm`` averaging.
    device : torch device for the U-Net.

    Returns
    -------
    :class:`CompositionResult`; ``labels`` is the L3 slice's (y, x) label map; measures are
    averaged over the slices within +/- ``neighbour_mm`` of L3 when that is > 0; the L3
    vertebral body's trabecular HU (:mod:`worker.composition.bone`) in ``trabecular``.

    Raises
    ------
    AnalysisError
        ``slice_index`` outside the volume, or the U-Net unavailable.
    """
    uid = volume.series_instance_uid
    n_z = volume.hu.shape[0]
    if not 0 <= slice_index < n_z:
        raise AnalysisError(uid, "composition", f"slice index {slice_index} outside 0..{n_z - 1}")
    spacing = (float(volume.pixel_spacing_mm[0]), float(volume.pixel_spacing_mm[1]))
    seg = segment_slice(volume.hu[slice_index], spacing, config, device=device, series_uid=uid)
    hu0 = np.asarray(volume.hu[slice_index], dtype=np.float32)
    measures = measure_labels(seg.labels, hu0, spacing)
    averaged = [slice_index]
    if config.neighbour_mm > 0:
        z0 = float(volume.z_mm[slice_index])
        near = np.flatnonzero(np.abs(volume.z_mm - z0) <= config.neighbour_mm + 1e-6)
        per = [measures]
        for i in near:
            if int(i) == slice_index:
                continue
            s = segment_slice(volume.hu[int(i)], spacing, config, device=device, series_uid=uid)
            per.append(measure_labels(s.labels, np.asarray(volume.hu[int(i)], np.float32), spacing))
        measures = _average_measures(per)
        averaged = sorted(int(i) for i in near)
    smi, smi_reason = skeletal_muscle_index(measures["sma"].area_cm2, volume.patient)
    bmi = body_mass_index(volume.patient)
    sarc = sarcopenia(smi, volume.patient, config.sarcopenia_cutoffs, bmi)
    flags = list(seg.qa_flags) + qa_flags(hu0, seg.labels, seg.body, spacing, config)
    trabecular = measure_trabecular_attenuation(volume, slice_index, config)
    log_event(
        logger,
        "composition_measured",
        series_instance_uid=uid,
        slice_index=slice_index,
        method=config.method,
        sma_cm2=round(measures["sma"].area_cm2, 2),
        qa_flags=flags,
    )
    return CompositionResult(
        slice_index=slice_index,
        labels=seg.labels,
        measures=measures,
        smi_cm2_per_m2=smi,
        smi_reason=smi_reason,
        sarcopenia=sarc,
        bmi_kg_per_m2=bmi,
        qa_flags=flags,
        method=config.method,
        slices_averaged=averaged,
        trabecular=trabecular,
    )
