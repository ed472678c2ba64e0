"""L3 vertebral body trabecular attenuation (HU): an opportunistic bone-density marker.

The trabecular (cancellous) bone of the vertebral body is measured on the L3 slice the
composition is measured on, with a region of interest (ROI) placed as readers place it for
opportunistic osteoporosis screening (Pickhardt et al. 2013, Ann Intern Med 158:588-595: an
oval ROI in the anterior vertebral body on the axial image, avoiding the cortex and the
posterior venous plexus):

1. the vertebral body is found among the vertebra's own bone (the classical vertebra step,
   :func:`worker.composition.vertebra.vertebra_parts`), outlined by its cortex (above
   :data:`CORTEX_FRACTION` of the vertebra's cortical HU, so that a contrast-filled vessel
   against it does not join it), closed and filled (:func:`body_from_bone`): the body only,
   its pedicles at most, never the canal or the arch (posterior elements);
2. of the body, only the anterior :data:`ANTERIOR_FRACTION` of its antero-posterior extent is
   kept (the basivertebral vein enters the posterior third, the pedicles join there);
3. that is eroded by :data:`RIM_MM` (the cortical shell, 1-1.5 mm, and the partial volume of
   one detector element; ANATOMY.md): the ROI;
4. the mean and SD of the HU in that ROI are pooled over the L3 slice and the slices whose
   centres are within :data:`NEIGHBOUR_MM` of it (the same ROI: the body is a vertical column
   over such a distance; the endplates are 12-15 mm from mid-body, ANATOMY.md: body height
   25-30 mm).

The value is refused (None with a reason, never a wrong number) when no vertebral body is
found on the slice, when the body is not one (too shallow or narrow: a disc level where only
the arch is bone), when the ROI is smaller than :data:`MIN_ROI_MM2`, when part of it is not
bone (below :data:`NOT_BONE_HU`) or when metal is in or beside the body (spinal hardware).

No threshold is applied. The published thresholds (Pickhardt et al. 2013: L1 trabecular
attenuation <= 110 HU about 90 % specific for osteoporosis, <= 160 HU about 90 % sensitive;
Jang et al. 2019, Radiology 291:360-367, normative values) are for L1; the trabecular HU falls
from L1 to L5 in the same person, so an L1 threshold does not transfer to L3, and none of the
sources at hand (/work/shared/ANATOMY.md, /work/shared/papers/) gives an L3 threshold that
can be cited precisely. The value is reported as a measurement only (docs/composition.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from core.config import CompositionConfig
from core.logs import log_event
from worker.composition.body import classify_tissue, denoise_low_dose, find_body
from worker.composition.morphology import close_disk, dilate_disk, erode_disk, fill_holes
from worker.composition.state import SliceState
from worker.composition.vertebra import find_vertebra
from worker.composition.wall import find_wall
from worker.volume.load import CTVolume

__all__ = [
    "ANTERIOR_FRACTION",
    "MIN_BODY_DEPTH_MM",
    "MIN_BODY_WIDTH_MM",
    "MIN_ROI_MM2",
    "NEIGHBOUR_MM",
    "RIM_MM",
    "TrabecularAttenuation",
    "measure_trabecular_attenuation",
    "trabecular_roi",
    "vertebral_body_mask",
]

logger = logging.getLogger(__name__)

#: Margin (mm) kept from the body's outline: cortical shell 1-1.5 mm (ANATOMY.md) plus the
#: partial volume of the detector (about 1 mm) and one pixel of rounding.
RIM_MM = 3.0
#: Anterior fraction of the body's antero-posterior depth the ROI keeps (Pickhardt et al.
#: 2013: anterior body; the basivertebral venous plexus enters the posterior third).
ANTERIOR_FRACTION = 0.6
#: Smallest ROI (mm^2) measured: 100 mm^2 averages >= 100 pixels at 1 mm (noise SD / 10);
#: the L3 body's cross-section is 10-15 cm^2 (ANATOMY.md: 40-50 x 30-35 mm), so the ROI of a
#: body is 3-6 cm^2.
MIN_ROI_MM2 = 100.0
#: A body shallower or narrower than this (mm) is not an L3 body (ANATOMY.md: lumbar bodies
#: 30-35 mm deep, 40-50 mm wide); at a disc level the arch alone is bone.
MIN_BODY_DEPTH_MM = 20.0
MIN_BODY_WIDTH_MM = 25.0
#: Fraction of the vertebra's own cortex HU (90th percentile of its bone) above which its
#: bone outlines the body: cortical bone 700-1500 HU, 300-500 where thin (osteoporosis,
#: partial volume); portal-phase blood 120-220 HU (ANATOMY.md). A vessel touching the body
#: then neither joins it nor fills as it does.
CORTEX_FRACTION = 0.6
#: Fewer connected pixels above that are noise, not cortex.
MIN_CORTEX_PIXELS = 4
#: Gap (mm) a thin or osteoporotic cortex may have that is still closed (1-2 pixels at 3 mm).
CORTEX_GAP_MM = 3.0
#: Radius (mm) of a disk the body contains and no process, lamina or pedicle does (ANATOMY.md:
#: body 30-35 x 40-50 mm; processes and laminae 5-10 mm thick).
BODY_MIN_RADIUS_MM = 8.0
#: Largest distance (mm) from the body's back to the posterior-most bone of the vertebra
#: (spinal canal 15-20 mm deep, lamina 5-10 mm; ANATOMY.md): a vessel or bowel loop in front
#: of a disc is further.
BODY_ARCH_GAP_MM = 30.0
#: Metal (> ``CompositionConfig.metal_hu``) within this distance (mm) of the body refuses the
#: value: pedicle screws run through the body and their streaks cross it.
METAL_MARGIN_MM = 10.0
#: 3x3-median HU below which a pixel is not trabecular bone (fat is -190..-30 HU,
#: Mitsiopoulos et al. 1998; fatty osteoporotic marrow stays above about 0 HU); more than
#: :data:`MAX_NOT_BONE_FRACTION` of the ROI there refuses the value (the ROI left the body).
NOT_BONE_HU = -50.0
MAX_NOT_BONE_FRACTION = 0.02
#: Neighbouring slices within this distance (mm, slice centres) of the L3 slice are pooled:
#: well inside the body (endplates 12-15 mm from mid-body, ANATOMY.md) even when the L3 slice
#: is 8 mm from mid-body.
NEIGHBOUR_MM = 3.0


@dataclass(frozen=True)
class TrabecularAttenuation:
    """Trabecular attenuation of the L3 vertebral body, or why it was not measured.

    Attributes
    ----------
    mean_hu : mean HU of the ROI pooled over ``slices``, or None (see ``reason``).
    sd_hu : population SD (HU) of those pixels, or None.
    roi_area_cm2 : area of the ROI on one slice (cm^2); 0 when refused.
    pixel_count : pixels pooled over all slices.
    slices : indices (into ``CTVolume.z_mm``) of the slices pooled, L3's first... sorted.
    roi : (y, x) bool ROI on the L3 slice (the measured slice's grid), or None.
    reason : why ``mean_hu`` is None (None when measured).
    """

    mean_hu: float | None
    sd_hu: float | None = None
    roi_area_cm2: float = 0.0
    pixel_count: int = 0
    slices: list[int] = field(default_factory=list)
    roi: np.ndarray | None = None
    reason: str | None = None


def vertebral_body_mask(
    hu: np.ndarray, spacing_mm: tuple[float, float], config: CompositionConfig
) -> np.ndarray | None:
    """The vertebral body on one slice, from the vertebra's own bone.

    The classical steps 1-5 (:mod:`worker.composition.classical`) find the vertebra's own
    bone (:attr:`worker.composition.vertebra.VertebraParts.bone`); :func:`body_from_bone`
    picks the body among it.

    Parameters
    ----------
    hu : (y, x) HU slice; y anterior->posterior, x patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    config : the composition configuration (``classical`` parameters).

    Returns
    -------
    (y, x) bool mask of the body (cortex included; posteriorly it may reach the pedicles
    and the canal they enclose),
    or None when the slice holds no body, no vertebra or fewer than 3 pixels of its front.
    """
    state = SliceState(np.asarray(hu, dtype=np.float32), tuple(spacing_mm), config)  # type: ignore[arg-type]
    find_body(state)
    denoise_low_dose(state)
    if not state.body.any():
        return None
    classify_tissue(state)
    find_wall(state)
    find_vertebra(state)
    # the raw HU: the denoised slice of a low-dose scan blurs the thin cortex below the
    # threshold
    return body_from_bone(np.asarray(hu, np.float32), state.vertebral_bone, state.px, config)


def body_from_bone(
    hu: np.ndarray, bone: np.ndarray | None, px: float, config: CompositionConfig
) -> np.ndarray | None:
    """The vertebral body among the vertebra's bone components (:func:`vertebral_body_mask`).

    The vertebra's grouped bone can hold structures in front of it (contrast-filled vessels
    or bowel loops above ``cortical_bone_hu``, grouped by the classical step because they do
    not matter to the composition). The body is the most posterior filled component that is
    thick (an inscribed disk of radius :data:`BODY_MIN_RADIUS_MM`: no process, lamina or
    pedicle is) and lies within :data:`BODY_ARCH_GAP_MM` in front of the posterior-most bone
    (the arch: the spinal canal is 15-20 mm deep, ANATOMY.md) or contains it; the body is its
    part within ``body_half_width_mm`` of its midline and ``body_depth_mm`` behind its
    anterior edge (the cortex closed over gaps of :data:`CORTEX_GAP_MM` and filled; never a
    convex hull, which would reach over the pedicles to the lateral cortex).

    Only its bone above :data:`CORTEX_FRACTION` of its cortex HU (and above
    ``cortical_bone_hu``) is used: a vessel in contact with the body (portal-phase blood
    120-220 HU) then neither joins it nor fills as it does.

    Parameters
    ----------
    hu : (y, x) HU slice.
    bone : (y, x) bool vertebra's own bone, or None.
    px : pixel size (mm).
    config : ``classical.body_half_width_mm``, ``classical.body_depth_mm``,
        ``classical.cortical_bone_hu``, ``metal_hu``.

    Returns
    -------
    (y, x) bool body mask, or None when no component qualifies.
    """
    if bone is None or not bone.any():
        return None
    p = config.classical
    # the vertebra's cortex HU, metal (pedicle screws) left out: the caller refuses metal
    not_metal = hu[bone][hu[bone] <= config.metal_hu]
    if not_metal.size == 0:
        return None
    cortex_hu = max(p.cortical_bone_hu, CORTEX_FRACTION * float(np.percentile(not_metal, 90)))
    bone = bone & (hu > cortex_hu)
    # isolated pixels of a noisy contrast-filled vessel above the threshold are not cortex
    lab_img, n = ndimage.label(bone, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab_img.ravel(), minlength=n + 1)
    bone = (sizes >= MIN_CORTEX_PIXELS)[lab_img] & bone
    if not bone.any():
        return None
    filled = fill_holes(close_disk(bone, max(1.0, CORTEX_GAP_MM / px)))
    lab_img, n = ndimage.label(filled, structure=np.ones((3, 3), bool))
    y_arch = int(np.nonzero(bone)[0].max())
    thick = ndimage.distance_transform_edt(filled) * px >= BODY_MIN_RADIUS_MM
    best, best_front = 0, -1
    for i in range(1, n + 1):
        comp = lab_img == i
        if not (thick & comp).any():
            continue
        rows = np.nonzero(comp)[0]
        if y_arch - rows.max() > BODY_ARCH_GAP_MM / px:
            continue
        if rows.min() > best_front:
            best, best_front = i, int(rows.min())
    if best == 0:
        return None
    comp = lab_img == best
    yy, xx = np.nonzero(comp & thick)
    x_c = float(np.median(xx))
    cols = np.arange(bone.shape[1])[None, :]
    rows_ = np.arange(bone.shape[0])[:, None]
    front = (
        comp
        & (np.abs(cols - x_c) <= p.body_half_width_mm / px)
        & (rows_ <= best_front + p.body_depth_mm / px)
    )
    return front


def trabecular_roi(
    body: np.ndarray, spacing_mm: tuple[float, float]
) -> tuple[np.ndarray | None, str | None]:
    """The trabecular ROI inside a vertebral body mask (steps 2-3 of the module docstring).

    The ROI is the body's anterior :data:`ANTERIOR_FRACTION` eroded by :data:`RIM_MM`.

    Parameters
    ----------
    body : (y, x) bool vertebral body (:func:`vertebral_body_mask`); y anterior->posterior.
    spacing_mm : (dy, dx) pixel spacing in mm.

    Returns
    -------
    roi : (y, x) bool ROI, or None.
    reason : why ``roi`` is None (the body too shallow or narrow, the ROI too small).
    """
    dy, dx = float(spacing_mm[0]), float(spacing_mm[1])
    rows = np.flatnonzero(body.any(axis=1))
    cols = np.flatnonzero(body.any(axis=0))
    depth_mm = (rows[-1] - rows[0] + 1) * dy
    width_mm = (cols[-1] - cols[0] + 1) * dx
    if depth_mm < MIN_BODY_DEPTH_MM or width_mm < MIN_BODY_WIDTH_MM:
        return None, (
            f"vertebral body {width_mm:.0f} x {depth_mm:.0f} mm (width x depth) is smaller "
            f"than {MIN_BODY_WIDTH_MM:.0f} x {MIN_BODY_DEPTH_MM:.0f} mm: not a vertebral body "
            "(a disc level?)"
        )
    # cut first, then erode: the ROI keeps RIM_MM from the cut too, where the pedicles join
    # the body and no cortex bounds the mask
    front = body.copy()
    y_back = rows[0] + ANTERIOR_FRACTION * (rows[-1] - rows[0] + 1)
    front[int(np.ceil(y_back)) :, :] = False
    roi = erode_disk(front, RIM_MM / min(dy, dx))
    area_mm2 = float(roi.sum()) * dy * dx
    if area_mm2 < MIN_ROI_MM2:
        return None, (f"trabecular ROI of {area_mm2:.0f} mm2 is smaller than {MIN_ROI_MM2:.0f} mm2")
    return roi, None


def measure_trabecular_attenuation(
    volume: CTVolume,
    slice_index: int,
    config: CompositionConfig,
    body: np.ndarray | None = None,
) -> TrabecularAttenuation:
    """Mean trabecular HU of the L3 vertebral body (the method of the module docstring).

    Parameters
    ----------
    volume : the CT series (``hu`` (z, y, x) HU, ``z_mm`` slice positions in mm,
        ``pixel_spacing_mm`` (dy, dx) mm).
    slice_index : index of the L3 slice into ``volume.z_mm``.
    config : the composition configuration (the classical vertebra parameters).
    body : (y, x) bool vertebral body of that slice when already found (the classical
        segmentation's ``vertebral_body``); found here when None.

    Returns
    -------
    :class:`TrabecularAttenuation`; ``mean_hu`` None with a ``reason`` when no vertebral body
    is found or the ROI is too small. Units: HU (the series' rescaled values).

    References
    ----------
    Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley N. Opportunistic
    screening for osteoporosis using abdominal computed tomography scans obtained for other
    indications. Ann Intern Med 2013;158(8):588-595 (the ROI placement; its thresholds are for
    L1 and are not applied here).
    """
    uid = volume.series_instance_uid
    spacing = (float(volume.pixel_spacing_mm[0]), float(volume.pixel_spacing_mm[1]))
    hu0 = np.asarray(volume.hu[slice_index], dtype=np.float32)
    if body is None:
        body = vertebral_body_mask(hu0, spacing, config)
    if body is None or not body.any():
        out = TrabecularAttenuation(None, reason="no vertebral body found on the L3 slice")
    else:
        roi, why = trabecular_roi(body, spacing)
        if roi is not None:
            med3 = ndimage.median_filter(hu0, size=3)
            soft = float((med3[roi] < NOT_BONE_HU).mean())
            if soft > MAX_NOT_BONE_FRACTION:
                roi, why = (
                    None,
                    (
                        f"{100 * soft:.0f} % of the trabecular ROI is below {NOT_BONE_HU:.0f} HU "
                        "(3x3 median): the ROI is not inside the vertebral body"
                    ),
                )
        near = dilate_disk(body, METAL_MARGIN_MM / min(spacing))
        if roi is not None and bool((hu0[near] > config.metal_hu).any()):
            roi, why = (
                None,
                (
                    f"metal (> {config.metal_hu:.0f} HU) in or beside the vertebral body "
                    "(spinal hardware): its streaks bias the trabecular HU"
                ),
            )
        if roi is None:
            out = TrabecularAttenuation(None, reason=why)
        else:
            z0 = float(volume.z_mm[slice_index])
            near = np.flatnonzero(np.abs(np.asarray(volume.z_mm) - z0) <= NEIGHBOUR_MM + 1e-6)
            slices = sorted({int(i) for i in near} | {int(slice_index)})
            vals = np.concatenate([np.asarray(volume.hu[i], dtype=np.float64)[roi] for i in slices])
            out = TrabecularAttenuation(
                mean_hu=float(vals.mean()),
                sd_hu=float(vals.std()),
                roi_area_cm2=float(roi.sum()) * spacing[0] * spacing[1] / 100.0,
                pixel_count=int(vals.size),
                slices=slices,
                roi=roi,
            )
    log_event(
        logger,
        "trabecular_attenuation",
        series_instance_uid=uid,
        slice_index=slice_index,
        measured=out.mean_hu is not None,
        n_slices=len(out.slices),
    )
    return out
