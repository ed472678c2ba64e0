"""Bowel contents with fat HU (stool, gas mixed with the bowel wall): not visceral fat."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.composition_params import ClassicalParams
from worker.composition.morphology import dilate_disk, disk


def bowel_contents(
    hu: np.ndarray,
    visceral_fat: np.ndarray,
    inner: np.ndarray,
    px: float,
    params: ClassicalParams,
) -> np.ndarray:
    """Fat-HU pixels that are bowel contents, not visceral adipose tissue.

    Parameters
    ----------
    hu : (y, x) HU slice.
    visceral_fat : (y, x) bool fat-HU pixels inside the abdominal wall, outside the muscles.
    inner : (y, x) bool region inside the abdominal wall
        (:func:`worker.composition.wall.wall_region`).
    px : pixel spacing (mm, the smaller of the two).
    params : ``gas_hu``, ``bowel_wall_mm``, ``bowel_lumen_cm2`` (0 disables the second
        rule), ``bowel_lumen_min_cm2``, ``bowel_lumen_solidity``, ``bowel_shell_mm``,
        ``bowel_shell_fraction``.

    Returns
    -------
    (y, x) bool mask, a subset of ``visceral_fat``.

    Notes
    -----
    Two anatomical rules (docs/composition.md, round 6):

    1. *Gas in the lumen*: fat lies outside the bowel wall, so no fat pixel is nearer to
       luminal gas (< ``gas_hu``) than the wall thickness (``bowel_wall_mm``) plus one pixel
       of partial volume. Fat-HU pixels that near are gas mixed with bowel wall or stool.
    2. *Enclosed lumen*: a fat-HU region of bowel-lumen size (``bowel_lumen_min_cm2``, a
       lumen about 11 mm across, .. ``bowel_lumen_cm2``) that is convex (solidity of the
       hole-filled region >= ``bowel_lumen_solidity``: a lumen is round or oval, fat pockets
       between loops are concave) and enclosed by a thin wall beyond which lies fat or gas
       (at least ``bowel_shell_fraction`` of the shell ``bowel_shell_mm`` wide just outside
       ``bowel_wall_mm``) is stool with fat HU. A fat region inside a thick organ (the renal
       sinus) is not enclosed by a thin wall and stays fat.
    """
    p = params
    out = np.zeros_like(visceral_fat)
    gas = (hu < p.gas_hu) & inner
    r_wall = max(1, int(np.ceil(p.bowel_wall_mm / px)))
    if gas.any():
        out |= visceral_fat & dilate_disk(gas, r_wall + 1)
    if p.bowel_lumen_cm2 <= 0:
        return out
    cand = visceral_fat & ~out
    # a one-pixel leak through the wall (noise, partial volume) must not join the lumen to
    # the fat outside: regions are taken after an opening and restored to ``cand`` below
    lab_img, n = ndimage.label(ndimage.binary_opening(cand, structure=disk(1)))
    if n == 0:
        return out
    px_cm2 = px * px / 100.0
    sizes = np.bincount(lab_img.ravel(), minlength=n + 1)[1:] * px_cm2
    from skimage.measure import regionprops

    r_in, r_out = r_wall + 1, r_wall + 1 + max(1, int(np.ceil(p.bowel_shell_mm / px)))
    pad = r_out + 1
    beyond_all = visceral_fat | gas
    for reg in regionprops(lab_img):
        area = sizes[reg.label - 1]
        if not (p.bowel_lumen_min_cm2 <= area <= p.bowel_lumen_cm2):
            continue
        # holes (noise, non-fat stool pixels) filled: a lumen's outline is convex
        if reg.area_filled / max(reg.area_convex, 1) < p.bowel_lumen_solidity:
            continue
        y0, x0, y1, x1 = reg.bbox
        y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
        y1, x1 = min(y1 + pad, hu.shape[0]), min(x1 + pad, hu.shape[1])
        comp = lab_img[y0:y1, x0:x1] == reg.label
        shell = dilate_disk(comp, r_out) & ~dilate_disk(comp, r_in)
        beyond = beyond_all[y0:y1, x0:x1] & ~comp
        if shell.any() and (beyond & shell).sum() >= p.bowel_shell_fraction * shell.sum():
            out[y0:y1, x0:x1] |= ndimage.binary_dilation(comp) & cand[y0:y1, x0:x1]
    return out
