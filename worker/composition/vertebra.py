"""Step 3 of the classical method: the vertebra (body, spinal canal, front of the arch).

Cancellous bone and the disc can be in the muscle HU range (osteoporosis, a disc level), so
the vertebra is found from its cortical bone and filled; it is never muscle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from core.composition_params import ClassicalParams
from worker.composition.morphology import close_disk, dilate_disk, fill_holes, open_disk
from worker.composition.state import SliceState


def canal_to_arch(
    hu: np.ndarray,
    bone: np.ndarray,
    body_hull: np.ndarray,
    px: float,
    x_c: float,
    params: ClassicalParams,
) -> np.ndarray:
    """The disc and spinal canal between the vertebral body and the front of its arch.

    Where the slice passes through an intervertebral disc (50-110 HU) or the pedicles are
    not in the slice, the canal is open to the sides (neural foramina) and no closing of
    the bone encloses it: the disc behind the endplate and the canal (CSF, cord, both in the
    muscle HU range) were taken as psoas (real case, T12-L2). No muscle lies between the
    back of the vertebral body and the front of its posterior arch (lamina, spinous process
    root) in the midline: the psoas is lateral to the body, the paraspinals behind the arch.
    The region is the convex hull of the body and of the arch's front: bone within
    ``canal_half_mm`` of the midline, less than ``canal_depth_mm`` behind the body,
    within ``arch_front_mm`` of its most anterior pixel (the lamina itself and the spinous
    process are not taken, so the muscle beside them stays muscle).

    Only when the hull taken as the body is one: bone, marrow or disc
    (> ``cortex_median_hu``) over at least ``1 - hull_max_soft`` of it. Where the body is
    not in the slice (a disc level with no endplate bone) the arch itself is taken as the
    body, its hull encloses the canal (CSF < 50 HU), and the bone behind it is the spinous
    process: the muscle beside it is multifidus (real case, z 79). Round 8 of
    docs/composition.md.

    Parameters
    ----------
    hu : (y, x) HU slice.
    bone : (y, x) bool cortical bone (> ``cortical_bone_hu``) inside the wall.
    body_hull : (y, x) bool convex hull of the vertebral body.
    px : pixel size (mm).
    x_c : column of the vertebra's midline (pixels).
    params : ``canal_half_mm``, ``canal_depth_mm``, ``arch_front_mm``, ``hull_max_soft``,
        ``cortex_median_hu``.

    Returns
    -------
    (y, x) bool mask (empty when no arch is found).
    """
    from skimage.morphology import convex_hull_image

    if float((hu[body_hull] < params.cortex_median_hu).mean()) > params.hull_max_soft:
        return np.zeros_like(bone)
    yy, xx = np.mgrid[0 : bone.shape[0], 0 : bone.shape[1]]
    y_back = float(np.nonzero(body_hull)[0].max())
    arch = (
        bone
        & (np.abs(xx - x_c) <= params.canal_half_mm / px)
        & (yy > y_back)
        & (yy <= y_back + params.canal_depth_mm / px)
    )
    if arch.sum() < 2:
        return np.zeros_like(bone)
    y_arch = float(np.nonzero(arch)[0].min())
    # each column of the arch is closed at its own front: the laminae run back and out from
    # the midline (a V), and the muscle behind and beside them is multifidus
    front_row = np.where(arch.any(axis=0), np.argmax(arch, axis=0), y_arch)
    arch &= yy <= y_arch + params.arch_front_mm / px
    return convex_hull_image(body_hull | arch) & (yy <= front_row[None, :])


class VertebraParts(NamedTuple):
    """What :func:`vertebra_parts` finds on one slice ((y, x) bool masks, or None).

    Attributes
    ----------
    mask : the vertebra: its bone filled, the body hull, the cancellous bone grown into, the
        spinal canal and the front of the arch (what is never muscle).
    body_hull : convex hull of the vertebral body's cortex (within ``body_depth_mm`` of the
        vertebra's front and ``body_half_width_mm`` of its midline, bone bordering marrow
        nearby included), or None when too little cortex is found for a hull (3 pixels).
    bone : the vertebra's own bone (> ``cortical_bone_hu``, its grouped components only:
        no bone merely near it, such as a calcified aortic plaque or a contrast-filled loop).
    """

    mask: np.ndarray | None
    body_hull: np.ndarray | None
    bone: np.ndarray | None


CanalRule = Callable[
    [np.ndarray, np.ndarray, np.ndarray, float, float, ClassicalParams], np.ndarray
]


def vertebra_mask(
    hu: np.ndarray,
    inner: np.ndarray,
    px: float,
    params: ClassicalParams,
    canal_rule: CanalRule = canal_to_arch,
) -> np.ndarray | None:
    """Filled mask of the vertebra: cortical bone closed, grouped and filled.

    The vertebra of :func:`vertebra_parts` without its body hull; same parameters and
    result.
    """
    return vertebra_parts(hu, inner, px, params, canal_rule).mask


def vertebra_parts(
    hu: np.ndarray,
    inner: np.ndarray,
    px: float,
    params: ClassicalParams,
    canal_rule: CanalRule = canal_to_arch,
) -> VertebraParts:
    """Filled mask of the vertebra, the convex hull of its body and its own bone.

    Parameters
    ----------
    hu : (y, x) HU slice.
    inner : (y, x) bool region inside the abdominal wall.
    px : pixel size (mm).
    params : vertebra parameters (``cortical_bone_hu``, ``vertebra_*``, ``cortex_*``,
        ``body_*``, ``marrow_*``, ``canal_closing_mm``).
    canal_rule : the disc/canal-to-arch rule (:func:`canal_to_arch`).

    Returns
    -------
    :class:`VertebraParts` (all None when there is less than ``vertebra_min_mm2`` of such
    bone).

    Notes
    -----
    Cancellous bone can be in the muscle HU range (osteoporosis), hence the filling. The
    vertebra is the largest bone component in the posterior half of the wall region, within
    ``vertebra_midline_mm`` of the midline, with the components beside or behind it within
    ``vertebra_group_mm`` (the other half of a vertebra whose thin cortex is interrupted);
    fragments of a thin cortex (<= ``cortex_fragment_mm2``) bridge gaps of up to
    ``cortex_gap_mm`` (rounds 6-8 of docs/composition.md).
    """
    p = params
    bone = (hu > p.cortical_bone_hu) & inner
    closed = close_disk(bone, max(2.0, p.vertebra_closing_mm / px))
    closed = fill_holes(closed)
    # A thin cortex (osteopenia, 3 mm pixels) is seen as isolated pixels one or two pixels
    # apart, which no closing joins: fragments of bone (<= ``cortex_fragment_mm2``) bridge
    # gaps of up to ``cortex_gap_mm`` (8-connected labelling of the closed bone with the
    # fragments dilated by half that gap). Only fragments: a contrast-filled vessel beside the
    # vertebral body is not joined to it. Taking one fragment (a pedicle) as the vertebra put
    # its midline beside the body's and left the rest of the body to the psoas (real case, L3).
    eight = np.ones((3, 3), bool)
    lab_img, n = ndimage.label(closed, structure=eight)
    if n == 0:
        return VertebraParts(None, None, None)
    sizes = np.bincount(lab_img.ravel(), minlength=n + 1)[1:] * px * px
    is_frag = np.zeros(n + 1, dtype=bool)
    is_frag[1:] = sizes <= p.cortex_fragment_mm2
    frag = is_frag[lab_img]
    chain_r = max(1.0, p.cortex_gap_mm / (2 * px))
    grouped = closed | dilate_disk(frag, chain_r)
    lab_img, n = ndimage.label(grouped, structure=eight)
    lab_img[~closed] = 0
    if n == 0:
        return VertebraParts(None, None, None)
    ys, xs_in = np.nonzero(inner)
    y_mid = (ys.min() + ys.max()) / 2
    x_mid = float(np.median(xs_in))
    index = np.arange(1, n + 1)
    counts = np.bincount(lab_img.ravel(), minlength=n + 1)[1:]
    present = counts > 0
    centres = ndimage.center_of_mass(np.ones(lab_img.shape), lab_img, index[present])
    best, best_size = 0, 0.0
    cands: list[tuple[int, float]] = []
    for i, (cy, cx_c) in zip(index[present], centres, strict=True):
        size = float(counts[i - 1])
        # the spine is in the midline (ribs are lateral), in the posterior half
        midline = abs(cx_c - x_mid) * px <= p.vertebra_midline_mm
        if cy >= y_mid - p.vertebra_front_margin_mm / px and midline:
            cands.append((int(i), cy))
            if size > best_size:
                best, best_size = int(i), size
    if best == 0:
        return VertebraParts(None, None, None)
    # A vertebra whose cortex is interrupted (osteopenia, 3 mm pixels) falls apart into its
    # left and right halves (pedicle, lamina and that side of the body): the parts in the
    # midline beside or behind the largest one, within ``vertebra_group_mm`` of it, are the
    # same vertebra (a calcified aorta lies in front of the vertebral body and is not taken).
    part = lab_img == best
    y_front = float(np.nonzero(part)[0].min())
    reach = dilate_disk(part, p.vertebra_group_mm / px)
    reached = np.zeros(n + 1, dtype=bool)
    reached[np.unique(lab_img[reach])] = True
    members = [best] + [i for i, cy in cands if i != best and cy >= y_front and reached[i]]
    group = np.isin(lab_img, members)
    # too little cortical bone is not a vertebra (a thin, osteoporotic cortex at 3 mm pixels
    # can be that small; the cancellous bone is added below)
    if float(group.sum()) * px * px < p.vertebra_min_mm2:
        return VertebraParts(None, None, None)
    # the closing only groups the vertebra's parts; the mask is the bone itself (the closing
    # would bridge the muscle between the transverse processes and the body)
    own_bone = bone & group
    vert = fill_holes(own_bone)
    # Vertebral body: convex hull of the bone within ``body_depth_mm`` of its anterior edge
    # and ``body_half_width_mm`` of the midline; a thin or interrupted cortex (osteoporosis,
    # 3 mm pixels) does not fill.
    from skimage.morphology import convex_hull_image

    _, vx = np.nonzero(vert)
    x_c = float(np.median(vx))
    yy, xx = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1]]
    near = dilate_disk(vert, p.cortex_reach_mm / px)
    # Bone near the vertebra that is not part of it is its cortex only where it borders
    # marrow (3x3 median > ``cortex_median_hu``: a cortex pixel of a thin rim has cancellous
    # bone on one side); a calcified plaque in the aortic wall borders blood and fat, and
    # taken into the hull it moved the body's front 12 mm forward (real case, z 74).
    med3 = ndimage.median_filter(hu, size=3)
    rim = near & (med3 > p.cortex_median_hu)
    cortex = bone & (group | rim) & (np.abs(xx - x_c) <= p.body_half_width_mm / px)
    body_hull = np.zeros_like(vert)
    if cortex.sum() >= 3:
        y_ant = np.nonzero(cortex)[0].min()
        front = cortex & (yy <= y_ant + p.body_depth_mm / px)
        if front.sum() >= 3:
            body_hull = convex_hull_image(front)
            vert |= body_hull
    # Osteoporotic or partial-volume cancellous bone (~100-150 HU, in the muscle range) with a
    # sparse cortex: grow the vertebra into the median-filtered > ``marrow_hu`` tissue it
    # touches.
    soft = (med3 > p.marrow_hu) & inner
    lab_soft, n_soft = ndimage.label(soft)
    touch = np.unique(lab_soft[ndimage.binary_dilation(vert, iterations=2) & soft])
    touch = touch[touch > 0]
    if touch.size:
        # only inside the vertebral body: elsewhere it is the partial-volume rim of the cortex,
        # whose muscle side is muscle
        grown = np.isin(lab_soft, touch) & ndimage.binary_dilation(body_hull, iterations=2)
        vert |= open_disk(grown, max(1.0, p.marrow_opening_mm / px))
    # spinal canal (CSF is in the muscle HU range): the hole a wider closing of the vertebra
    # encloses, within ``canal_half_mm`` of the midline and behind the body's front (bone in
    # front of the body, a calcified aortic plaque, must not pull the aorta into the vertebra)
    y_body = float(np.nonzero(vert)[0].min())
    wide = fill_holes(close_disk(vert | (bone & near), max(2.0, p.canal_closing_mm / px)))
    vert |= wide & (np.abs(xx - x_c) <= p.canal_half_mm / px) & (yy >= y_body)
    if body_hull.any():
        vert |= canal_rule(hu, bone, body_hull, px, x_c, p)
    return VertebraParts(vert, body_hull if body_hull.any() else None, own_bone)


def find_vertebra(state: SliceState, canal_rule: CanalRule = canal_to_arch) -> SliceState:
    """Step: ``state.vertebra`` and ``state.vertebral_bone`` (:func:`vertebra_parts`) from
    ``hu`` and ``inner``."""
    parts = vertebra_parts(state.hu, state.inner, state.px, state.params, canal_rule)
    state.vertebra, state.vertebral_bone = parts.mask, parts.bone
    return state
