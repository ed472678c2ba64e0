"""Body composition at L3: SMA, IMAT, VAT and SAT segmented and measured.

HU ranges: skeletal muscle -29..+150 HU, adipose tissue -190..-30 HU (Mitsiopoulos et al.
1998). Skeletal muscle index SMI = SMA / height^2 (cm^2/m^2); sarcopenia cut-offs from Prado
et al. 2008 or Martin et al. 2013.

Two segmenters share one interface (:func:`segment_slice`): the classical method in this
module (body mask, HU ranges, the abdominal wall found by ray casting as the SAT/VAT
boundary, psoas selected by its position beside the vertebral body) and the 2-D U-Net of
:mod:`worker.composition.unet`. ``CompositionConfig.method`` chooses; the measurements in
``docs/composition.md`` decided the default.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from core import labels as lab
from core.config import CompositionConfig
from core.errors import AnalysisError
from core.logs import log_event
from worker.volume.load import CTVolume, PatientInfo

logger = logging.getLogger(__name__)

#: Prado et al. 2008 (Lancet Oncol 9:629): sarcopenia if SMI (cm^2/m^2) below.
PRADO_2008_CM2_PER_M2 = {"M": 52.4, "F": 38.5}
#: Martin et al. 2013 (J Clin Oncol 31:1539): men 43 (BMI < 25) or 53 (BMI >= 25), women 41.
MARTIN_2013_MEN_BMI_LT25 = 43.0
MARTIN_2013_MEN_BMI_GE25 = 53.0
MARTIN_2013_WOMEN = 41.0
#: BMI boundary (kg/m^2) of Martin et al. 2013 (WHO overweight threshold).
MARTIN_2013_BMI_SPLIT = 25.0
#: fat-HU holes of a muscle this small (pixels) are not taken as intramuscular fat spots
_MIN_SPOT_PX = 3
#: smallest bowel lumen (cm^2, about 11 mm across) taken as enclosed stool; smaller fat
#: islands stay fat
_MIN_LUMEN_CM2 = 1.0


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
# helpers
# --------------------------------------------------------------------------------------


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + 0.25


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab_img, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(lab_img), lab_img, index=np.arange(1, n + 1))
    return lab_img == (int(np.argmax(sizes)) + 1)


def _small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Holes of ``mask`` (background components it encloses) of at most ``max_px`` pixels."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    lab_img, n = ndimage.label(holes)
    if n == 0:
        return holes
    sizes = ndimage.sum_labels(np.ones_like(lab_img), lab_img, np.arange(1, n + 1))
    return np.isin(lab_img, np.flatnonzero(sizes <= max_px) + 1)


def in_hu_range(hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """Boolean mask of ``lo <= hu <= hu_range[1]`` (both bounds inclusive).

    Parameters
    ----------
    hu : array of Hounsfield units, any shape.
    hu_range : (low, high) in HU, inclusive, e.g. (-29, 150) for skeletal muscle
        (Mitsiopoulos et al. 1998).
    """
    lo, hi = hu_range
    return (hu >= lo) & (hu <= hi)


def _circular_median(values: np.ndarray, size: int) -> np.ndarray:
    return ndimage.median_filter(values, size=size, mode="wrap")


def noise_sd(hu: np.ndarray, body: np.ndarray) -> float:
    """Robust noise SD (HU) of a slice: MAD of the residual of a 3x3 median in soft tissue.

    Parameters
    ----------
    hu : (y, x) HU slice.
    body : (y, x) bool trunk mask; only pixels with |HU| < 300 inside it are used.

    Returns
    -------
    Noise SD estimate in HU (1.4826 x MAD, x 1.2 for the median's own smoothing); 0 when no
    soft tissue is present.
    """
    soft = body & (np.abs(hu) < 300)
    if not soft.any():
        return 0.0
    d = (hu - ndimage.median_filter(hu, size=3))[soft]
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) * 1.2


def denoise_slice(hu: np.ndarray, sigma_hu: float) -> np.ndarray:
    """Edge-preserving total-variation denoising (Chambolle 2004) of a noisy slice.

    Used to classify low-dose slices (PET/CT attenuation CT) by HU range: muscle and fat are
    piecewise-constant, so TV keeps their borders while the noise that pushes pixels across
    the Mitsiopoulos thresholds is removed.

    Parameters
    ----------
    hu : (y, x) HU slice.
    sigma_hu : noise SD (HU) from :func:`noise_sd`; sets the TV weight (1.5 sigma).

    Returns
    -------
    (y, x) float32 denoised HU; pixels outside -300..300 HU keep their value.
    """
    from skimage.restoration import denoise_tv_chambolle

    # air kept at -1000 HU so the skin border does not move; bone clipped at 300 HU
    clipped = np.clip(hu, -1000.0, 300.0) / 1000.0
    den = denoise_tv_chambolle(clipped, weight=1.5 * sigma_hu / 1000.0) * 1000.0
    return np.where(np.abs(hu) < 300.0, den, hu).astype(np.float32)


# --------------------------------------------------------------------------------------
# classical segmentation
# --------------------------------------------------------------------------------------


def body_mask(
    hu: np.ndarray, spacing_mm: tuple[float, float], config: CompositionConfig
) -> tuple[np.ndarray, list[str]]:
    """Trunk mask of an axial slice: air, table and arms excluded, holes filled.

    Parameters
    ----------
    hu : (y, x) float array, HU; y rows anterior->posterior, x columns patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    config : thresholds (``body_hu``, ``table_opening_mm``, ``arm_separation_mm``,
        ``arm_min_area_cm2``).

    Returns
    -------
    (mask, flags) : (y, x) bool trunk mask; flags among "arms_in_slice", "body_truncated".

    Notes
    -----
    The table is thin (a few mm) and lies outside the skin: an opening of radius
    ``table_opening_mm`` and the largest connected component remove it. Arms are parts of
    the body that an opening of radius ``arm_separation_mm`` detaches from the trunk and that
    are thick (> 8 mm) and large (> ``arm_min_area_cm2``); separate arm components are
    excluded by the largest-component step. Bowel gas is inside the filled mask.
    """
    px = float(min(spacing_mm))
    pix_cm2 = spacing_mm[0] * spacing_mm[1] / 100.0
    flags: list[str] = []
    raw = hu > config.body_hu
    opened = ndimage.binary_opening(raw, structure=_disk(config.table_opening_mm / px))
    body = _largest_component(opened)
    body = ndimage.binary_fill_holes(body)
    # Components other than the trunk: large ones are arms (arms beside the body, not touching).
    lab_img, n = ndimage.label(opened & ~body)
    if n:
        sizes = ndimage.sum_labels(np.ones_like(lab_img), lab_img, np.arange(1, n + 1))
        if np.any(sizes * pix_cm2 >= config.arm_min_area_cm2):
            flags.append("arms_in_slice")
    # Arms touching the trunk: detached by a larger opening.
    r_arm = config.arm_separation_mm / px
    if r_arm >= 1:
        core = _largest_component(ndimage.binary_erosion(body, structure=_disk(r_arm)))
        if core.any():
            trunk = ndimage.binary_dilation(core, structure=_disk(r_arm)) & body
            rest = body & ~trunk
            lab_img, n = ndimage.label(rest)
            if n:
                thick = ndimage.distance_transform_edt(rest) * px
                for i in range(1, n + 1):
                    comp = lab_img == i
                    if comp.sum() * pix_cm2 >= config.arm_min_area_cm2 and thick[comp].max() > 8:
                        body &= ~comp
                        if "arms_in_slice" not in flags:
                            flags.append("arms_in_slice")
                body = _largest_component(body)
    # Truncation: the trunk touches the image edge or the padding outside the FOV circle.
    edge = np.zeros_like(body)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    outside_fov = hu < -1500.0
    touching = ndimage.binary_dilation(body) & (edge | outside_fov)
    if touching.sum() * px >= config.truncation_min_mm:
        flags.append("body_truncated")
    return body, flags


def _rays(
    centre: tuple[float, float], n_angles: int, r_max: float, step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample coordinates of rays from ``centre``: (angles, radii, ys, xs), ys (a, r)."""
    angles = np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False)
    radii = np.arange(0.0, r_max, step)
    ys = centre[0] + np.outer(np.sin(angles), radii)
    xs = centre[1] + np.outer(np.cos(angles), radii)
    return angles, radii, ys, xs


def _sample(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    yi = np.clip(np.rint(ys).astype(int), 0, mask.shape[0] - 1)
    xi = np.clip(np.rint(xs).astype(int), 0, mask.shape[1] - 1)
    inside = (ys >= -0.5) & (ys <= mask.shape[0] - 0.5) & (xs >= -0.5) & (xs <= mask.shape[1] - 0.5)
    return mask[yi, xi] & inside


def _first_run(flags: np.ndarray, start: int, min_len: int) -> int:
    """Index of the first run of ``min_len`` True values at or after ``start`` (or -1)."""
    run = 0
    for i in range(start, len(flags)):
        if flags[i]:
            run += 1
            if run >= min_len:
                return i - min_len + 1
        else:
            run = 0
    return -1


def _polygon_mask(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    rr, cc = polygon(ys, xs, shape=shape)
    mask[rr, cc] = True
    return mask


def wall_region(
    hu: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
) -> np.ndarray:
    """Region inside the abdominal wall fascia: the SAT/VAT boundary.

    Rays are cast from the body centroid; along each ray, from the skin inward, the skin
    (``skin_mm``) is skipped and the wall is the first run of non-fat tissue at least
    ``wall_min_mm`` thick. Where the muscle ring has a gap (linea alba, thin obliques) a ray
    runs on into the viscera; such rays are outliers of the subcutaneous thickness along the
    circumference and are replaced by the circular median of their neighbours
    (``wall_median_deg``), so gaps, bowel gas and oral contrast cannot break the split.

    Parameters
    ----------
    hu : (y, x) HU slice.
    body : (y, x) bool trunk mask from :func:`body_mask`.
    spacing_mm : (dy, dx) in mm.
    config : HU ranges and wall parameters.

    Returns
    -------
    (y, x) bool mask of everything inside the outer surface of the abdominal wall muscles
    (muscles, viscera, spine included; SAT and skin excluded).
    """
    px = float(min(spacing_mm))
    step = 0.5  # pixels
    step_mm = step * px
    cy, cx = ndimage.center_of_mass(body)
    r_max = float(np.hypot(*hu.shape)) + 2
    angles, radii, ys, xs = _rays((cy, cx), 360, r_max, step)
    # Physical (anisotropic) spacing: sample in pixel units, convert distances per ray.
    in_body = _sample(body, ys, xs)
    fat = _sample(in_hu_range(hu, config.fat_hu) & body, ys, xs)
    # anything that is not fat stops the ray: muscle, organs, bone, contrast, bowel gas
    dense = _sample(~in_hu_range(hu, config.fat_hu) & body, ys, xs)
    # skin plus one pixel of partial volume with the air outside
    skin_n = max(int(round((config.skin_mm + px) / step_mm)), 1)
    wall_n = max(int(round(config.wall_min_mm / step_mm)), 2)
    n_a = len(angles)
    sat_depth = np.full(n_a, np.nan)
    r_skin = np.zeros(n_a)
    # rays leaving the body at the image edge or into the padding outside the reconstruction
    # circle: the skin (and maybe the wall) is outside the field of view
    truncated = np.zeros(n_a, dtype=bool)
    found_trunc = np.full(n_a, np.nan)
    ny, nx = hu.shape
    outside_fov = _sample(hu < -1500.0, ys, xs)
    for a in range(n_a):
        idx = np.flatnonzero(in_body[a])
        if idx.size == 0:
            continue
        i_skin = int(idx[-1])
        r_skin[a] = radii[i_skin]
        y_s, x_s = ys[a, i_skin], xs[a, i_skin]
        nxt = min(i_skin + int(round(1.5 / step)), ys.shape[1] - 1)
        truncated[a] = (
            y_s < 1.0 or y_s > ny - 2.0 or x_s < 1.0 or x_s > nx - 2.0 or bool(outside_fov[a, nxt])
        )
        inward_dense = dense[a, i_skin::-1]
        inward_fat = fat[a, i_skin::-1]
        # skip the skin: leading dense samples up to skin_n (no skin at a cut edge)
        j = 0
        while not truncated[a] and j < min(skin_n, len(inward_dense)) and not inward_fat[j]:
            j += 1
        k = _first_run(inward_dense, j, wall_n)
        if k < 0:
            continue
        if truncated[a]:
            found_trunc[a] = k * step
        else:
            sat_depth[a] = k * step
    valid = np.isfinite(sat_depth)
    if valid.sum() < n_a // 8:
        # (almost) the whole skin is outside the field of view: rely on the cut-edge rays
        if not np.isfinite(found_trunc).any():
            return body.copy()
        sat_depth = np.where(truncated & np.isfinite(found_trunc), found_trunc, sat_depth)
        valid = np.isfinite(sat_depth)
        truncated[:] = False
    typical = float(np.nanmedian(sat_depth))
    # truncated rays do not take part in the smoothing: interpolate them from their neighbours
    if (~valid).any():
        ang_ok = np.flatnonzero(valid)
        sat_depth[~valid] = np.interp(np.flatnonzero(~valid), ang_ok, sat_depth[ang_ok], period=n_a)
    tol = config.wall_outlier_mm / px
    # isolated spikes either way (a vessel or septum in the fat, a skin fold) first
    med_small = _circular_median(sat_depth, 9)
    sat_depth = np.where(np.abs(sat_depth - med_small) > tol, med_small, sat_depth)
    win = max(int(config.wall_median_deg) | 1, 3)
    med = _circular_median(sat_depth, win)
    # a gap in the ring only ever makes the subcutaneous layer look thicker: lower envelope
    depth = np.where(sat_depth - med > tol, med, sat_depth)
    depth = _circular_median(depth, 5)
    # At a cut edge the wall is the first dense run within twice the usual subcutaneous depth
    # (it varies around the trunk) from the edge; without one the wall lies outside the image
    # and everything inside is visceral.
    if truncated.any():
        ok = np.isfinite(found_trunc) & (found_trunc <= 2.0 * typical + tol)
        # Where the cut edge is far from the trunk (an image corner) the subcutaneous layer
        # there is thicker than that; a dense run deeper than the limit is still the wall when
        # it continues the wall of the rays around it (within ``wall_outlier_mm``).
        sure = ~truncated | ok
        far = truncated & np.isfinite(found_trunc) & ~ok
        r_sure = r_skin - np.where(truncated, np.nan_to_num(found_trunc), depth)
        while far.any() and sure.any():  # grown ray by ray from the sure rays
            i_sure, i_far = np.flatnonzero(sure), np.flatnonzero(far)
            r_ref = np.interp(i_far, i_sure, r_sure[i_sure], period=n_a)
            gap = np.abs(r_sure[i_far] - r_ref) <= tol
            # only the rays next to a sure ray are decided in each pass
            nxt = sure[(i_far - 1) % n_a] | sure[(i_far + 1) % n_a]
            if not (gap & nxt).any():
                break
            ok[i_far[gap & nxt]] = True
            sure[i_far[gap & nxt]] = True
            far[i_far[gap & nxt]] = False
        depth = np.where(truncated, np.where(ok, np.nan_to_num(found_trunc), 0.0), depth)
    r_wall = np.maximum(r_skin - depth, 0.0)
    wy = cy + np.sin(angles) * r_wall
    wx = cx + np.cos(angles) * r_wall
    return _polygon_mask(hu.shape, wy, wx) & body


#: largest gap (mm) between pixels of a thin vertebral cortex that still belong together
_CORTEX_GAP_MM = 6.0
#: largest piece of bone (mm^2) taken as a fragment of such a cortex
_CORTEX_FRAGMENT_MM2 = 50.0
#: 3x3 median HU above which bone beside the vertebra borders marrow (is its cortex)
_CORTEX_MEDIAN_HU = 50.0


def _vertebra(hu: np.ndarray, inner: np.ndarray, px: float) -> np.ndarray | None:
    """Filled mask of the vertebra: cortical bone (> 200 HU) closed and filled.

    Cancellous bone can be in the muscle HU range (osteoporosis), hence the filling. The
    vertebra is the largest bone component in the posterior half of the wall region, within
    40 mm of the midline, with the components beside or behind it within 20 mm (the other
    half of a vertebra whose thin cortex is interrupted); fragments of a thin cortex
    (<= ``_CORTEX_FRAGMENT_MM2``) bridge gaps of up to ``_CORTEX_GAP_MM``. Returns a (y, x)
    bool mask, or None when there is less than 2 cm^2 of such bone.
    """
    bone = (hu > 200) & inner
    closed = ndimage.binary_closing(bone, structure=_disk(max(2.0, 5.0 / px)))
    closed = ndimage.binary_fill_holes(closed)
    # A thin cortex (osteopenia, 3 mm pixels) is seen as isolated pixels one or two pixels
    # apart, which no closing joins: fragments of bone (<= ``_CORTEX_FRAGMENT_MM2``) bridge
    # gaps of up to ``_CORTEX_GAP_MM`` (8-connected labelling of the closed bone with the
    # fragments dilated by half that gap). Only fragments: a contrast-filled vessel beside the
    # vertebral body is not joined to it. Taking one fragment (a pedicle) as the vertebra put
    # its midline beside the body's and left the rest of the body to the psoas (real case, L3).
    eight = np.ones((3, 3), bool)
    lab_img, n = ndimage.label(closed, structure=eight)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(closed, lab_img, np.arange(1, n + 1)) * px * px
    frag = np.isin(lab_img, np.flatnonzero(sizes <= _CORTEX_FRAGMENT_MM2) + 1)
    chain_r = max(1.0, _CORTEX_GAP_MM / (2 * px))
    grouped = closed | ndimage.binary_dilation(frag, structure=_disk(chain_r))
    lab_img, n = ndimage.label(grouped, structure=eight)
    lab_img[~closed] = 0
    if n == 0:
        return None
    ys, xs_in = np.nonzero(inner)
    y_mid = (ys.min() + ys.max()) / 2
    x_mid = float(np.median(xs_in))
    best, best_size = 0, 0.0
    cands: list[tuple[int, float]] = []
    for i in range(1, n + 1):
        comp = lab_img == i
        size = float(comp.sum())
        cy, cx_c = ndimage.center_of_mass(comp)
        # the spine is in the midline (ribs are lateral), in the posterior half
        midline = abs(cx_c - x_mid) * px <= 40.0
        if cy >= y_mid - 10 / px and midline:
            cands.append((i, cy))
            if size > best_size:
                best, best_size = i, size
    if best == 0:
        return None
    # A vertebra whose cortex is interrupted (osteopenia, 3 mm pixels) falls apart into its
    # left and right halves (pedicle, lamina and that side of the body): the parts in the
    # midline beside or behind the largest one, within 20 mm of it, are the same vertebra
    # (a calcified aorta lies in front of the vertebral body and is not taken).
    part = lab_img == best
    y_front = float(np.nonzero(part)[0].min())
    reach = ndimage.binary_dilation(part, structure=_disk(20.0 / px))
    members = [best] + [
        i for i, cy in cands if i != best and cy >= y_front and (reach & (lab_img == i)).any()
    ]
    group = np.isin(lab_img, members)
    # < 2 cm^2 of cortical bone is not a vertebra (a thin, osteoporotic cortex at 3 mm
    # pixels can be that small; the cancellous bone is added below)
    if float(group.sum()) * px * px < 200:
        return None
    # the closing only groups the vertebra's parts; the mask is the bone itself (the closing
    # would bridge the muscle between the transverse processes and the body)
    vert = ndimage.binary_fill_holes(bone & group)
    # Vertebral body: convex hull of the bone within 35 mm of its anterior edge and 25 mm of
    # the midline; a thin or interrupted cortex (osteoporosis, 3 mm pixels) does not fill.
    from skimage.morphology import convex_hull_image

    _, vx = np.nonzero(vert)
    x_c = float(np.median(vx))
    yy, xx = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1]]
    near = ndimage.binary_dilation(vert, structure=_disk(20.0 / px))
    # Bone near the vertebra that is not part of it is its cortex only where it borders
    # marrow (3x3 median > ``_CORTEX_MEDIAN_HU``: a cortex pixel of a thin rim has cancellous
    # bone on one side); a calcified plaque in the aortic wall borders blood and fat, and
    # taken into the hull it moved the body's front 12 mm forward (real case, z 74).
    med3 = ndimage.median_filter(hu, size=3)
    rim = near & (med3 > _CORTEX_MEDIAN_HU)
    cortex = bone & (group | rim) & (np.abs(xx - x_c) <= 25 / px)
    body_hull = np.zeros_like(vert)
    if cortex.sum() >= 3:
        y_ant = np.nonzero(cortex)[0].min()
        front = cortex & (yy <= y_ant + 35 / px)
        if front.sum() >= 3:
            body_hull = convex_hull_image(front)
            vert |= body_hull
    # Osteoporotic or partial-volume cancellous bone (~100-150 HU, in the muscle range) with a
    # sparse cortex: grow the vertebra into the median-filtered > 110 HU tissue it touches.
    soft = (med3 > 110) & inner
    lab_soft, n_soft = ndimage.label(soft)
    touch = np.unique(lab_soft[ndimage.binary_dilation(vert, iterations=2) & soft])
    touch = touch[touch > 0]
    if touch.size:
        # only inside the vertebral body: elsewhere it is the partial-volume rim of the cortex,
        # whose muscle side is muscle
        grown = np.isin(lab_soft, touch) & ndimage.binary_dilation(body_hull, iterations=2)
        vert |= ndimage.binary_opening(grown, structure=_disk(max(1.0, 2.0 / px)))
    # spinal canal (CSF is in the muscle HU range): the hole a wider closing of the vertebra
    # encloses, within 15 mm of the midline and behind the body's front (bone in front of
    # the body, a calcified aortic plaque, must not pull the aorta into the vertebra)
    y_body = float(np.nonzero(vert)[0].min())
    wide = ndimage.binary_fill_holes(
        ndimage.binary_closing(vert | (bone & near), structure=_disk(max(2.0, 8.0 / px)))
    )
    vert |= wide & (np.abs(xx - x_c) <= 15 / px) & (yy >= y_body)
    if body_hull.any():
        vert |= _canal_to_arch(hu, bone, body_hull, px, x_c)
    return vert


#: half-width (mm) of the midline band holding the spinal canal and the lamina, depth (mm)
#: behind the vertebral body within which the arch's front is searched, and the thickness
#: (mm) of that front
_CANAL_HALF_MM, _CANAL_DEPTH_MM, _ARCH_FRONT_MM = 15.0, 30.0, 6.0
#: largest fraction of a vertebral body's hull below ``_CORTEX_MEDIAN_HU``
_HULL_MAX_SOFT = 0.25


def _canal_to_arch(
    hu: np.ndarray, bone: np.ndarray, body_hull: np.ndarray, px: float, x_c: float
) -> np.ndarray:
    """The disc and spinal canal between the vertebral body and the front of its arch.

    Where the slice passes through an intervertebral disc (50-110 HU) or the pedicles are
    not in the slice, the canal is open to the sides (neural foramina) and no closing of
    the bone encloses it: the disc behind the endplate and the canal (CSF, cord, both in the
    muscle HU range) were taken as psoas (real case, T12-L2). No muscle lies between the
    back of the vertebral body and the front of its posterior arch (lamina, spinous process
    root) in the midline: the psoas is lateral to the body, the paraspinals behind the arch.
    The region is the convex hull of the body and of the arch's front: bone within
    ``_CANAL_HALF_MM`` of the midline, less than ``_CANAL_DEPTH_MM`` behind the body,
    within ``_ARCH_FRONT_MM`` of its most anterior pixel (the lamina itself and the spinous
    process are not taken, so the muscle beside them stays muscle).

    Only when the hull taken as the body is one: bone, marrow or disc (> 50 HU) over at least
    ``1 - _HULL_MAX_SOFT`` of it. Where the body is not in the slice (a disc level with no
    endplate bone) the arch itself is taken as the body, its hull encloses the canal
    (CSF < 50 HU), and the bone behind it is the spinous process: the muscle beside it is
    multifidus (real case, z 79).

    Returns a (y, x) bool mask (empty when no arch is found).
    """
    from skimage.morphology import convex_hull_image

    if float((hu[body_hull] < _CORTEX_MEDIAN_HU).mean()) > _HULL_MAX_SOFT:
        return np.zeros_like(bone)
    yy, xx = np.mgrid[0 : bone.shape[0], 0 : bone.shape[1]]
    y_back = float(np.nonzero(body_hull)[0].max())
    arch = (
        bone
        & (np.abs(xx - x_c) <= _CANAL_HALF_MM / px)
        & (yy > y_back)
        & (yy <= y_back + _CANAL_DEPTH_MM / px)
    )
    if arch.sum() < 2:
        return np.zeros_like(bone)
    y_arch = float(np.nonzero(arch)[0].min())
    # each column of the arch is closed at its own front: the laminae run back and out from
    # the midline (a V), and the muscle behind and beside them is multifidus
    front_row = np.where(arch.any(axis=0), np.argmax(arch, axis=0), y_arch)
    arch &= yy <= y_arch + _ARCH_FRONT_MM / px
    return convex_hull_image(body_hull | arch) & (yy <= front_row[None, :])


#: psoas-candidate regions: organ minimum area (mm^2), contact distance to the vertebra (mm),
#: and depth behind the body's front (mm)
_ORGAN_MIN_MM2, _PSOAS_TOUCH_MM, _BODY_DEPTH_MM = 500.0, 8.0, 35.0
#: depth (mm) of the neck between two blobs of the psoas candidates that splits them
_SPLIT_DEPTH_MM = 3.0


def _without_lateral_organ(
    keep: np.ndarray, near: np.ndarray, px: float, x_c: float, y_ant: float
) -> np.ndarray:
    """Psoas candidates without an organ joined to their lateral side (round 7).

    An unenhanced kidney (10-40 HU) touching the psoas without a fat plane at 3 mm pixels
    joins it and the opening cannot separate them. The psoas hugs the vertebral body; the
    kidney lies lateral to it. The candidates are split by a watershed of their distance map
    (one marker per blob: h-maxima of depth ``_SPLIT_DEPTH_MM``); a region of
    >= ``_ORGAN_MIN_MM2`` that is not within ``_PSOAS_TOUCH_MM`` of the vertebra, lies in
    front of the body's back (``y_ant`` + ``_BODY_DEPTH_MM``) and lateral to a region of the
    same side that does touch the vertebra is dropped.

    Parameters
    ----------
    keep : (y, x) bool, the kept psoas / paravertebral candidates.
    near : (y, x) bool, the vertebra (:func:`_vertebra`) dilated by ``_PSOAS_TOUCH_MM``.
    px : pixel size (mm).
    x_c, y_ant : column of the body's midline and row of its front (pixels).

    Returns
    -------
    (y, x) bool, ``keep`` without the dropped regions.
    """
    from skimage.segmentation import watershed

    if not keep.any():
        return keep
    dist = ndimage.distance_transform_edt(keep)
    # One marker per blob: the maxima of the distance map that rise at least
    # ``_SPLIT_DEPTH_MM`` above the saddle joining them (h-maxima). Markers taken only by
    # their spacing (peak_local_max, 10 mm apart: round 7) cut an unenhanced kidney at 3 mm
    # pixels into pieces of 1-5 cm^2, each below ``_ORGAN_MIN_MM2`` (real case, L1-L2).
    from skimage.morphology import h_maxima

    h = max(1.0, _SPLIT_DEPTH_MM / px)
    markers, n_mk = ndimage.label(h_maxima(dist, h), structure=np.ones((3, 3), bool))
    if n_mk < 2:
        return keep
    regions = watershed(-dist, markers, mask=keep)
    info = []
    for i in range(1, int(regions.max()) + 1):
        r = regions == i
        if r.any():
            cy, cx = ndimage.center_of_mass(r)
            info.append((i, float(r.sum()) * px * px, bool((r & near).any()), cy, cx - x_c))
    out = keep.copy()
    for i, area, touch, cy, dx in info:
        if area < _ORGAN_MIN_MM2 or touch or cy > y_ant + _BODY_DEPTH_MM / px:
            continue
        if any(t and np.sign(d) == np.sign(dx) and abs(d) < abs(dx) for _, _, t, _, d in info):
            out &= regions != i
    return out


def bowel_contents(
    hu: np.ndarray,
    visceral_fat: np.ndarray,
    inner: np.ndarray,
    px: float,
    config: CompositionConfig,
) -> np.ndarray:
    """Fat-HU pixels that are bowel contents, not visceral adipose tissue.

    Parameters
    ----------
    hu : (y, x) HU slice.
    visceral_fat : (y, x) bool fat-HU pixels inside the abdominal wall, outside the muscles.
    inner : (y, x) bool region inside the abdominal wall (:func:`wall_region`).
    px : pixel spacing (mm, the smaller of the two).
    config : ``bowel_wall_mm``, ``bowel_lumen_cm2`` (0 disables the second rule).

    Returns
    -------
    (y, x) bool mask, a subset of ``visceral_fat``.

    Notes
    -----
    Two anatomical rules (docs/composition.md, round 6):

    1. *Gas in the lumen*: fat lies outside the bowel wall, so no fat pixel is nearer to
       luminal gas (< -500 HU) than the wall thickness (``bowel_wall_mm``) plus one pixel of
       partial volume. Fat-HU pixels that near are gas mixed with bowel wall or stool.
    2. *Enclosed lumen*: a fat-HU region of bowel-lumen size (1 cm², a lumen about 11 mm
       across, .. ``bowel_lumen_cm2``) that is convex (solidity of the hole-filled region
       >= 0.85: a lumen is round or oval, fat pockets between loops are concave) and
       enclosed by a thin wall beyond which lies fat or gas (at least half of the shell
       just outside ``bowel_wall_mm``) is stool with fat HU. A fat region inside a thick
       organ (the renal sinus) is not enclosed by a thin wall and stays fat.
    """
    out = np.zeros_like(visceral_fat)
    gas = (hu < -500) & inner
    r_wall = max(1, int(np.ceil(config.bowel_wall_mm / px)))
    if gas.any():
        out |= visceral_fat & ndimage.binary_dilation(gas, structure=_disk(r_wall + 1))
    if config.bowel_lumen_cm2 <= 0:
        return out
    cand = visceral_fat & ~out
    # a one-pixel leak through the wall (noise, partial volume) must not join the lumen to
    # the fat outside: regions are taken after an opening and restored to ``cand`` below
    lab_img, n = ndimage.label(ndimage.binary_opening(cand, structure=_disk(1)))
    if n == 0:
        return out
    px_cm2 = px * px / 100.0
    sizes = ndimage.sum_labels(np.ones_like(lab_img), lab_img, np.arange(1, n + 1)) * px_cm2
    from skimage.measure import regionprops

    r_in, r_out = r_wall + 1, r_wall + 1 + max(1, int(np.ceil(3.0 / px)))
    pad = r_out + 1
    for reg in regionprops(lab_img):
        area = sizes[reg.label - 1]
        if not (_MIN_LUMEN_CM2 <= area <= config.bowel_lumen_cm2):
            continue
        # holes (noise, non-fat stool pixels) filled: a lumen's outline is convex
        if reg.area_filled / max(reg.area_convex, 1) < 0.85:
            continue
        y0, x0, y1, x1 = reg.bbox
        y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
        y1, x1 = min(y1 + pad, hu.shape[0]), min(x1 + pad, hu.shape[1])
        comp = lab_img[y0:y1, x0:x1] == reg.label
        shell = ndimage.binary_dilation(comp, structure=_disk(r_out)) & ~ndimage.binary_dilation(
            comp, structure=_disk(r_in)
        )
        beyond = (visceral_fat | gas)[y0:y1, x0:x1] & ~comp
        if shell.any() and (beyond & shell).sum() >= 0.5 * shell.sum():
            out[y0:y1, x0:x1] |= ndimage.binary_dilation(comp) & cand[y0:y1, x0:x1]
    return out


def _attached(keep: np.ndarray, near: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Psoas candidates that are attached to the vertebra or to a wall muscle.

    The psoas arises from the vertebral bodies and transverse processes, the quadratus
    lumborum and the paraspinals lie against the transverse processes and the posterior
    wall: each touches the vertebra or another muscle. A candidate only *near* the wall
    muscles (``_PSOAS_TOUCH_MM``) but separated from them by a fat rim is an organ in its
    own fat: a kidney pole in its perirenal fat, the duodenum (real case, L1-L3: 3.5-19.7
    cm^2 components, none of them muscle). Components of ``keep`` not within
    ``_PSOAS_TOUCH_MM`` of the vertebra and not adjacent (8-connected) to ``wall`` are
    dropped.

    Parameters
    ----------
    keep : (y, x) bool, the kept psoas / paravertebral candidates.
    near : (y, x) bool, the vertebra (:func:`_vertebra`) dilated by ``_PSOAS_TOUCH_MM``.
    wall : (y, x) bool, the wall-band muscles found by the rays.

    Returns
    -------
    (y, x) bool, ``keep`` without the detached components.
    """
    lab_k, n = ndimage.label(keep)
    if n == 0:
        return keep
    touch = ndimage.binary_dilation(wall, structure=np.ones((3, 3), bool))
    ok = np.zeros(n + 1, dtype=bool)
    ok[np.unique(lab_k[near | touch])] = True
    ok[0] = False
    return ok[lab_k]


#: wall-band spikes: half window (rays, one per degree) on each side, and the excess (mm)
#: over both sides' medians that makes a ray a spike
_SPIKE_HALF_RAYS, _SPIKE_MM = 10, 10.0


def _without_spikes(thick: np.ndarray, check: np.ndarray, unit_mm: float) -> np.ndarray:
    """Wall-muscle band thickness with narrow spikes cut back to their surroundings.

    A ray that runs through a thin wall muscle into an organ abutting it with no fat plane
    at the slice's resolution (a liver or spleen tip behind the lateral wall at T12-L2,
    3 mm pixels) and out into the fat behind it ends on a fat plane like a true muscle ray,
    but 20-40 mm deeper than the rays beside it: the band gets a wedge of organ. A muscle's
    thickness does not jump like that over a few degrees. A ray of ``check`` whose thickness
    exceeds the medians of the ``_SPIKE_HALF_RAYS`` rays on *each* side by more than
    ``_SPIKE_MM`` takes the larger of the two medians; the spikes found leave the medians
    and the search repeats (a spike of more than half the window is peeled from its middle
    out). Requiring both sides keeps a one-sided rise (the quadratus lumborum and
    latissimus thickening towards the paraspinals).

    Parameters
    ----------
    thick : (n_rays,) band thickness per ray, in units of ``unit_mm`` mm; rays ordered by
        angle around the full circle.
    check : (n_rays,) bool, the rays that may be cut (not the paraspinal rays).
    unit_mm : mm per unit of ``thick``.

    Returns
    -------
    (n_rays,) float array, the cleaned thickness in the same units.
    """
    n = thick.size
    ar = np.arange(n)[:, None]
    offs = np.arange(1, _SPIKE_HALF_RAYS + 1)[None, :]
    cut = np.zeros(n, dtype=bool)
    base = thick
    # a spike wider than half the window hides in its edge rays' medians: rays found to be
    # spikes leave the medians and the search repeats (the spike is peeled from its middle
    # out), at most once per ray of the half window
    for _ in range(_SPIKE_HALF_RAYS):
        work = np.where(cut, np.nan, thick)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN side: the other side
            left = np.nanmedian(work[(ar - offs) % n], axis=1)
            right = np.nanmedian(work[(ar + offs) % n], axis=1)
        base = np.fmax(left, right)
        new = check & ~cut & ((thick - base) * unit_mm > _SPIKE_MM)
        if not new.any():
            break
        cut |= new
    return np.where(cut & np.isfinite(base), np.minimum(thick, base), thick)


def segment_classical(
    hu: np.ndarray, spacing_mm: tuple[float, float], config: CompositionConfig
) -> SliceSegmentation:
    """Classical (threshold + anatomy) segmentation of an axial slice at L3.

    Parameters
    ----------
    hu : (y, x) float array, HU; y anterior->posterior, x patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    config : HU ranges (Mitsiopoulos et al. 1998 by default) and geometric parameters.

    Returns
    -------
    :class:`SliceSegmentation` with labels SMA / IMAT / VAT / SAT on the source grid.

    Notes
    -----
    1. Trunk mask (:func:`body_mask`): table and arms excluded.
    2. Abdominal wall (:func:`wall_region`): fat outside it is SAT.
    3. Wall muscles: from the wall inward, muscle-HU tissue is followed along each ray up to
       the first fat layer (``muscle_band_max_mm``); rays that run into an organ or bowel
       abutting the wall (stopped by bone, contrast, gas or the maximum) take at most the
       circular median of the fat-terminated rays, and narrow spikes of the band thickness
       are cut back (:func:`_without_spikes`).
    4. Psoas and the other paravertebral muscles: muscle-HU components touching the vertebra
       (bone > 200 HU) inside a box around the vertebral body that does not extend in front
       of it in the midline (aorta, IVC, duodenum); opened first so that thin bridges to a
       kidney or bowel loop do not carry them in; an organ joined to a psoas's lateral side
       (:func:`_without_lateral_organ`) and candidates detached from the muscles by a fat
       rim (:func:`_attached`) are dropped.
    5. IMAT: fat inside the closed muscle compartments; VAT: the remaining fat inside the
       wall. Bowel gas and contrast are neither muscle nor fat and do not affect the split.
    """
    hu = np.asarray(hu, dtype=np.float32)
    px = float(min(spacing_mm))
    body, flags = body_mask(hu, spacing_mm, config)
    # Low-dose noise pushes pixels across the HU thresholds: classify on a denoised image when
    # the noise estimate exceeds ``denoise_above_hu`` (areas only; mean HU is measured on the
    # original pixels).
    if body.any() and config.denoise_above_hu > 0:
        sigma = noise_sd(hu, body)
        if sigma > config.denoise_above_hu:
            hu = denoise_slice(hu, sigma)
    out = np.zeros(hu.shape, dtype=np.uint8)
    if not body.any():
        return SliceSegmentation(out, body, flags)
    fat = in_hu_range(hu, config.fat_hu) & body
    muscle_hu = in_hu_range(hu, config.muscle_hu) & body
    inner = wall_region(hu, body, spacing_mm, config)

    vert = _vertebra(hu, inner, px)
    y_vert = float(ndimage.center_of_mass(vert)[0]) if vert is not None else None

    # --- wall muscles (rays from the wall inward)
    cy, cx = ndimage.center_of_mass(body)
    step = 0.5
    r_max = float(np.hypot(*hu.shape)) + 2
    angles, radii, ys, xs = _rays((cy, cx), 360, r_max, step)
    s_inner = _sample(inner, ys, xs)
    # Fat spots inside a muscle (IMAT, myosteatosis) do not end it: the rays see the muscle
    # with its fat-HU holes up to ``psoas_hole_mm2`` filled (a fat plane is not a hole).
    # Holes of <= _MIN_SPOT_PX pixels are not filled: at 3 mm pixels they are the thin fat
    # plane between a muscle and an organ abutting it, at fine pixels noise.
    not_vert = ~vert if vert is not None else np.ones_like(body)
    spots = _small_holes(muscle_hu & not_vert, config.psoas_hole_mm2 / (px * px)) & fat
    spots &= ~_small_holes(muscle_hu & not_vert, _MIN_SPOT_PX)
    s_musc = _sample((muscle_hu | spots) & not_vert, ys, xs)
    s_fat = _sample(fat & ~spots, ys, xs)
    # the posterior band never extends in front of the vertebral body (psoas are found below)
    if vert is not None:
        vy_all, vx_all = np.nonzero(vert)
        y_front, x_mid = float(vy_all.min()), float(np.median(vx_all))
        yy0 = np.arange(hu.shape[0])[:, None] * np.ones((1, hu.shape[1]), bool)
        s_front = _sample(yy0 < y_front, ys, xs)
    else:
        y_front, x_mid = 0.0, cx
        s_front = np.zeros_like(s_fat)
    gap_n = max(int(round(config.imat_gap_mm / (step * px))), 1)
    n_a = len(angles)
    r_wall = np.zeros(n_a)
    thick = np.zeros(n_a)
    terminated = np.zeros(n_a, dtype=bool)
    posterior = np.zeros(n_a, dtype=bool)
    paraspinal = np.zeros(n_a, dtype=bool)
    for a in range(n_a):
        idx = np.flatnonzero(s_inner[a])
        if idx.size == 0:
            continue
        i0 = int(idx[-1])
        r_wall[a] = radii[i0]
        y_w = cy + np.sin(angles[a]) * radii[i0]
        x_w = cx + np.cos(angles[a]) * radii[i0]
        posterior[a] = y_vert is not None and y_w > y_vert
        paraspinal[a] = posterior[a] and abs(x_w - x_mid) * px <= config.paraspinal_half_width_mm
        if paraspinal[a]:
            max_mm = config.muscle_band_max_mm
        elif posterior[a]:
            max_mm = config.posterior_wall_max_mm
        else:
            max_mm = config.wall_muscle_max_mm
        max_n = int(round(max_mm / (step * px)))
        m = s_musc[a, i0::-1]
        f = s_fat[a, i0::-1]
        if posterior[a]:  # never in front of the vertebral body (psoas are found below)
            m = m & ~s_front[a, i0::-1]
            f = f & ~s_front[a, i0::-1]
        j, last_m, fat_run = 0, -1, 0
        while j < min(len(m), max_n):
            if m[j]:
                last_m, fat_run = j, 0
            elif f[j]:
                fat_run += 1
                if fat_run > gap_n:
                    terminated[a] = True
                    break
            else:
                # Only a fat plane proves the muscle ended. Bone or contrast (a rib, a loop
                # of opacified bowel) does not, and neither does gas: gas lies in a bowel
                # lumen, so a ray reaching it crossed the bowel wall, and the bowel's fluid
                # contents where a fluid-filled loop abuts the wall (real case, T12-L1: a
                # 20 mm "muscle" under the rectus).
                break
            j += 1
        thick[a] = (last_m + 1) * step
    # Rays that ran into an organ or bowel abutting the wall (no fat plane before the
    # maximum) take at most the circular median of the fat-terminated rays around them. Only
    # the paraspinal rays are trusted without a fat plane (erector spinae and multifidus
    # reach the lamina); lateral to them a deep posterior ray without one ran into the
    # kidney, liver or spleen.
    good = terminated | paraspinal
    if good.any():
        half = max(int(config.wall_median_deg), 3)
        fixed = thick.copy()
        for a in np.flatnonzero(~good):
            win = (np.arange(a - half, a + half + 1)) % n_a
            ok = win[good[win] & ~paraspinal[win]]
            ref = thick[ok] if ok.size else thick[good & ~paraspinal]
            if ref.size:
                fixed[a] = min(thick[a], float(np.median(ref)))
        thick = fixed
    thick = _without_spikes(thick, ~paraspinal, px)
    r_in = np.maximum(r_wall - thick, 0.0)
    inner_core = _polygon_mask(hu.shape, cy + np.sin(angles) * r_in, cx + np.cos(angles) * r_in)
    band = inner & ~inner_core
    sma = muscle_hu & band
    if vert is not None:
        sma &= ~vert

    # --- psoas / paravertebral muscles beside the vertebra
    if vert is not None:
        vy, vx = np.nonzero(vert)
        y_ant = float(vy.min())
        x_c = float(np.median(vx[vy <= y_ant + 25 / px]))
        body_half_w = max(float(np.ptp(vx[vy <= y_ant + 25 / px])) / 2, 15 / px)
        yy, xx = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1]]
        box = (
            (yy >= y_ant - config.psoas_anterior_mm / px)
            & (yy <= y_ant + config.psoas_posterior_mm / px)
            & (np.abs(xx - x_c) <= body_half_w + config.psoas_lateral_mm / px)
        )
        # no muscle in front of the vertebral body in the midline (aorta, IVC, duodenum)
        box &= ~((yy < y_ant + 5 / px) & (np.abs(xx - x_c) < body_half_w))
        cand = muscle_hu & inner & box & ~sma & ~vert
        r_open = max(1.0, config.psoas_opening_mm / px)
        # fat spots inside a muscle (IMAT, myosteatosis) and noise would let the opening eat
        # the muscle itself: open the candidate with its small holes filled
        solid = cand | (_small_holes(cand, config.psoas_hole_mm2 / (px * px)) & fat)
        opened = ndimage.binary_opening(solid, structure=_disk(r_open))
        near_vert = ndimage.binary_dilation(
            vert | sma, structure=_disk(max(1.0, _PSOAS_TOUCH_MM / px))
        )
        lab_img, n = ndimage.label(opened)
        keep = np.zeros_like(cand)
        for i in range(1, n + 1):
            comp = lab_img == i
            if (comp & near_vert).any() and comp.sum() * px * px >= 100:
                keep |= comp
        # restore the border removed by the opening, within the candidate mask
        keep = ndimage.binary_dilation(keep, structure=_disk(r_open)) & cand
        near_body = ndimage.binary_dilation(vert, structure=_disk(max(1.0, _PSOAS_TOUCH_MM / px)))
        keep = _without_lateral_organ(keep, near_body, px, x_c, y_ant)
        keep = _attached(keep, near_body, sma)
        sma |= keep

    # --- IMAT and VAT
    close_r = max(1.0, config.imat_close_mm / px)
    compartment = ndimage.binary_closing(sma, structure=_disk(close_r))
    # small holes (<= 5 cm^2) are fat inside a muscle; the abdominal cavity is not
    compartment |= _small_holes(compartment, 500.0 / (px * px))
    compartment &= inner
    if vert is not None:
        compartment &= ~vert
    # muscle between fat streaks that stopped the rays (fatty infiltration) is muscle too
    sma |= muscle_hu & compartment
    # the outer layer of a wall muscle the ray casting put outside the wall (partial volume
    # with the subcutaneous fat, a smoothed-over bulge): muscle-HU tissue connected to the
    # muscle, deeper than the skin and within ``wall_outlier_mm`` of the wall
    skin = body & ~ndimage.binary_erosion(body, structure=_disk((config.skin_mm + px) / px))
    near_wall = ndimage.binary_dilation(inner, structure=_disk(config.wall_outlier_mm / px))
    outer = muscle_hu & ~inner & ~skin & near_wall
    if outer.any() and sma.any():
        sma |= ndimage.binary_propagation(sma, mask=sma | outer) & outer
    # fat enclosed by muscle, not the fat lining the compartment's surface
    compartment = ndimage.binary_erosion(compartment, structure=_disk(1.0))
    imat = fat & compartment & ~sma
    # pixels between bowel gas and the bowel wall fall in the fat range by partial volume
    gas = (hu < -500) & inner
    if gas.any():
        fat_pv = fat & ndimage.binary_dilation(gas, structure=_disk(max(1.0, 1.5 / px)))
        fat = fat & ~fat_pv
        imat &= ~fat_pv
    # bowel contents with fat HU (stool, gas mixed with wall or stool) are not fat either
    fat &= ~bowel_contents(hu, fat & inner & ~imat, inner, px, config)
    vat = fat & inner & ~imat
    sat = fat & ~inner
    out[sat] = lab.SAT
    out[vat] = lab.VAT
    out[imat] = lab.IMAT
    out[sma] = lab.SMA
    return SliceSegmentation(out, body, flags, wall=inner)


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
        return None, f"PatientSize {h} m implausible (not metres?): SMI not computed"
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

    body, flags = body_mask(np.asarray(hu, np.float32), spacing_mm, config)
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
    averaged over the slices within +/- ``neighbour_mm`` of L3 when that is > 0.

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
    )
