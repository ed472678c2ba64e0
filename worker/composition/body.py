"""Step 1 of the classical method: the trunk mask (table and arms excluded), truncation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.composition_params import ClassicalParams
from worker.composition.hu import denoise_slice, in_hu_range, noise_sd
from worker.composition.morphology import (
    dilate_disk,
    erode_disk,
    fill_holes,
    largest_component,
    open_disk,
)
from worker.composition.state import SliceState


def body_mask(
    hu: np.ndarray, spacing_mm: tuple[float, float], params: ClassicalParams
) -> tuple[np.ndarray, list[str]]:
    """Trunk mask of an axial slice: air, table and arms excluded, holes filled.

    Parameters
    ----------
    hu : (y, x) float array, HU; y rows anterior->posterior, x columns patient right->left.
    spacing_mm : (dy, dx) pixel spacing in mm.
    params : ``body_hu``, ``table_opening_mm``, ``arm_separation_mm``, ``arm_min_area_cm2``,
        ``arm_min_thickness_mm``, ``truncation_min_mm``, ``padding_hu``.

    Returns
    -------
    (mask, flags) : (y, x) bool trunk mask; flags among "arms_in_slice", "body_truncated".

    Notes
    -----
    The table is thin (a few mm) and lies outside the skin: an opening of radius
    ``table_opening_mm`` and the largest connected component remove it. Arms are parts of
    the body that an opening of radius ``arm_separation_mm`` detaches from the trunk and that
    are thick (> ``arm_min_thickness_mm``) and large (> ``arm_min_area_cm2``); separate arm
    components are excluded by the largest-component step. Bowel gas is inside the filled
    mask.
    """
    px = float(min(spacing_mm))
    pix_cm2 = spacing_mm[0] * spacing_mm[1] / 100.0
    flags: list[str] = []
    raw = hu > params.body_hu
    opened = open_disk(raw, params.table_opening_mm / px)
    body = largest_component(opened)
    body = fill_holes(body)
    # Components other than the trunk: large ones are arms (arms beside the body, not touching).
    lab_img, n = ndimage.label(opened & ~body)
    if n:
        sizes = np.bincount(lab_img.ravel(), minlength=n + 1)[1:]
        if np.any(sizes * pix_cm2 >= params.arm_min_area_cm2):
            flags.append("arms_in_slice")
    # Arms touching the trunk: detached by a larger opening.
    r_arm = params.arm_separation_mm / px
    if r_arm >= 1:
        core = largest_component(erode_disk(body, r_arm))
        if core.any():
            trunk = dilate_disk(core, r_arm) & body
            rest = body & ~trunk
            lab_img, n = ndimage.label(rest)
            if n:
                thick = ndimage.distance_transform_edt(rest) * px
                sizes = np.bincount(lab_img.ravel(), minlength=n + 1)
                for i in np.flatnonzero(sizes * pix_cm2 >= params.arm_min_area_cm2):
                    if i > 0 and thick[lab_img == i].max() > params.arm_min_thickness_mm:
                        body &= lab_img != i
                        if "arms_in_slice" not in flags:
                            flags.append("arms_in_slice")
                body = largest_component(body)
    # Truncation: the trunk touches the image edge or the padding outside the FOV circle.
    edge = np.zeros_like(body)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    outside_fov = hu < params.padding_hu
    touching = ndimage.binary_dilation(body) & (edge | outside_fov)
    if touching.sum() * px >= params.truncation_min_mm:
        flags.append("body_truncated")
    return body, flags


def find_body(state: SliceState) -> SliceState:
    """Step: ``state.body`` and ``state.flags`` from :func:`body_mask`."""
    state.body, flags = body_mask(state.hu, state.spacing_mm, state.params)
    state.flags = list(flags)
    return state


def denoise_low_dose(state: SliceState) -> SliceState:
    """Step: TV-denoise ``state.hu`` when its noise SD exceeds ``denoise_above_hu``.

    Low-dose noise pushes pixels across the HU thresholds: tissue is classified on the
    denoised image (areas only; mean HU is measured on the original pixels).
    """
    p = state.params
    if state.body is not None and state.body.any() and p.denoise_above_hu > 0:
        sigma = noise_sd(state.hu, state.body, p.noise_soft_tissue_hu, p.noise_median_gain)
        if sigma > p.denoise_above_hu:
            state.hu = denoise_slice(state.hu, sigma, p.noise_soft_tissue_hu, p.tv_weight_per_sigma)
    return state


def classify_tissue(state: SliceState) -> SliceState:
    """Step: ``state.fat`` and ``state.muscle``, the Mitsiopoulos HU ranges inside the body."""
    state.fat = in_hu_range(state.hu, state.config.fat_hu) & state.body
    state.muscle = in_hu_range(state.hu, state.config.muscle_hu) & state.body
    return state
