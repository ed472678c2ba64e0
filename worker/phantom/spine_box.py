"""Training and evaluation cases for the level-verification network.

One case is the 1 mm box of :mod:`worker.locator.vertebrae` around a phantom's lumbar spine,
made the way the pipeline makes it from a real series, with its reference segmentation:

1. the phantom (style A, :func:`worker.phantom.sample_anatomy`) is rendered on a local grid
   around the column (170 x 160 mm in plane, slice thickness 1-5 mm, pixel size
   0.6-3 mm), over a z range that a scanner's field of view may cut;
2. a simulated locator answer (the true mid-L3 moved by up to one and a half vertebrae) is
   where :func:`~worker.locator.vertebrae.box_at_level` places the box, exactly as at run
   time (the column centre moved by up to 10 mm, as far as its estimate errs on patients);
3. the reference classes are drawn from the skeleton's tagged primitives
   (``anat.extra["bone_tags"]``) on the box's 1 mm grid: vertebral bodies, bony ribs, sacrum
   (coverage above one half), nothing outside the scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from worker.locator.vertebrae import (
    BODY,
    BOX_SHAPE,
    RIB,
    SACRUM,
    SpineBox,
    box_at_level,
)
from worker.phantom import PhantomSpec, phantom_anatomy
from worker.phantom.anatomy import Anatomy
from worker.phantom.primitives import BoneBuffers, SliceGrid
from worker.phantom.render import RenderGrid, render

__all__ = ["SpineCase", "render_parts", "spine_case"]

#: Slice thicknesses (mm) a case is rendered at (the phantom's, without the slowest 0.625).
CASE_THICKNESSES = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)


@dataclass
class SpineCase:
    """A training or evaluation box and its reference.

    Attributes
    ----------
    box : the image box (:class:`~worker.locator.vertebrae.SpineBox`), z in the phantom's
        body frame (mm, 0 = top of S1).
    classes : (z, y, x) uint8 reference classes (:data:`worker.locator.vertebrae.CLASSES`).
    instance : (z, y, x) uint8, 1 + index into ``names`` of the vertebral body at each voxel,
        0 elsewhere.
    names : vertebra names ("T12", "L1", ...), in the anatomy's order.
    truth : ``l3_mid_mm``, ``l3_range_mm``, ``vertebrae_mm`` (name -> (bottom, top)),
        ``n_lumbar``, ``n_rib_pairs``, ``transitional``, ``locator_z_mm`` (the simulated
        answer the box is centred on), ``scan_mm`` (the scanned z range), ``seed``.
    """

    box: SpineBox
    classes: np.ndarray
    instance: np.ndarray
    names: list[str]
    truth: dict[str, Any] = field(default_factory=dict)


def render_parts(anat: Anatomy, grid: RenderGrid, parts: list[list[int]]) -> list[np.ndarray]:
    """Coverage masks of groups of bone primitives on ``grid``.

    Parameters
    ----------
    anat : a sampled patient with ``extra["bone_tags"]``.
    grid : voxel centres (body frame, mm).
    parts : per mask, indices into ``anat.bones``.

    Returns
    -------
    list of (z, y, x) bool, coverage above one half, one per group.
    """
    sg = SliceGrid(grid.xs, grid.ys, grid.pixel_mm, grid.thickness_mm)
    shape = (len(grid.zs), len(grid.ys), len(grid.xs))
    out = [np.zeros(shape, dtype=bool) for _ in parts]
    bufs = BoneBuffers(np.zeros(shape[1:], np.float32), np.zeros(shape[1:], np.float32))
    prims = [[anat.bones[i] for i in group] for group in parts]
    for g, group in enumerate(prims):
        zmin = min(p.zmin for p in group) if group else np.inf
        zmax = max(p.zmax for p in group) if group else -np.inf
        for i, z in enumerate(grid.zs):
            if z < zmin or z > zmax:
                continue
            bufs.alpha.fill(0.0)
            bufs.bone.fill(0.0)
            for p in group:
                if p.zmin <= z <= p.zmax:
                    p.draw_bone(float(z), sg, bufs)
            out[g][i] = bufs.alpha > 0.5
    return out


def spine_case(
    seed: int, spec: PhantomSpec | None = None, *, max_error_mm: float = 55.0
) -> SpineCase:
    """Render one box of a style-A phantom and its reference segmentation.

    Parameters
    ----------
    seed : the phantom's seed (deterministic).
    spec : fixed phantom properties (``n_lumbar``, ``n_rib_pairs``, ``site``, ...); the
        field of view and image size of the spec are ignored (the case has its own).
    max_error_mm : the simulated locator answer lies within this distance of mid-L3.

    Returns
    -------
    SpineCase
    """
    spec = spec or PhantomSpec()
    anat, rng = phantom_anatomy(seed, PhantomSpec(**{**spec.__dict__, "fov": "abdomen"}))
    crng = np.random.default_rng([seed, 0x5B1E])  # the case's own draws: anatomy unchanged
    v = {x.name: x for x in anat.vertebrae}
    l3 = v["L3"]
    locator_z = l3.zm + float(crng.uniform(-max_error_mm, max_error_mm))
    nz = BOX_SHAPE[0]
    lo, hi = locator_z - nz / 2 - 5, locator_z + nz / 2 + 5
    # a scanner's field of view may cut the box (no ribs, no sacrum, lumbar windows)
    r = crng.random()
    if r < 0.2:
        hi = float(crng.uniform(l3.zm + 50, hi))
    elif r < 0.35:
        lo = float(crng.uniform(lo, l3.zm - 50))
    thk = float(crng.choice(CASE_THICKNESSES))
    # diagnostic in-plane pixels (0.6-1.0 mm) and, one case in three, the coarse ones of a
    # low-dose or reformatted series (up to 3 mm, as the real case of ../shared/data)
    px = float(crng.uniform(0.6, 1.0) if crng.random() < 2 / 3 else crng.uniform(1.0, 3.0))
    cx, cy = l3.cx, anat.spine_y(l3.zm)
    xs = np.arange(cx - 85.0, cx + 85.0, px)
    ys = np.arange(cy - 60.0, cy + 100.0, px)
    zs = np.arange(lo, hi, thk)
    hu, _ = render(anat, RenderGrid(xs, ys, zs, px, thk), rng, with_labels=False)
    # the column estimate is cleaner on a phantom than on a patient (measured 10 mm off on
    # the real case): move it as far
    shift = (float(crng.uniform(-10.0, 10.0)), float(crng.uniform(-6.0, 6.0)))
    box = box_at_level(hu, zs, (px, px), locator_z, shift_yx_mm=shift)
    # the box's 1 mm grid in the body frame (grid mm + the local render's first pixel)
    oz, oy, ox = box.origin_mm
    bgrid = RenderGrid(
        xs[0] + ox + np.arange(BOX_SHAPE[2], dtype=float),
        ys[0] + oy + np.arange(BOX_SHAPE[1], dtype=float),
        oz + np.arange(nz, dtype=float),
        1.0,
        1.0,
    )
    tags: dict[str, list[int]] = anat.extra["bone_tags"]
    names = [x.name for x in anat.vertebrae]
    body_keys = [f"body:{n}" for n in names]
    masks = render_parts(anat, bgrid, [tags["rib"], tags["sacrum"]] + [tags[k] for k in body_keys])
    classes = np.zeros(BOX_SHAPE, dtype=np.uint8)
    instance = np.zeros(BOX_SHAPE, dtype=np.uint8)
    classes[masks[0]] = RIB
    classes[masks[1]] = SACRUM
    for i, m in enumerate(masks[2:]):
        classes[m] = BODY
        instance[m] = i + 1
    # where two bodies touch (osteophytes bridging a collapsed disc) the reference keeps a
    # one-voxel gap: the network learns to part them, so that they can be counted
    hi = ndimage.maximum_filter(instance, size=3)
    lo = ndimage.minimum_filter(np.where(instance > 0, instance, 255).astype(np.uint8), size=3)
    contact = (instance > 0) & ((hi != instance) | (lo != instance))
    classes[contact] = 0
    instance[contact] = 0
    classes[~box.in_scan] = 0
    instance[~box.in_scan] = 0
    truth = {
        "seed": seed,
        "l3_mid_mm": l3.zm,
        "l3_range_mm": (l3.z0, l3.z1),
        "vertebrae_mm": {x.name: (x.z0, x.z1) for x in anat.vertebrae},
        "n_lumbar": int(
            anat.variants.get("n_lumbar", sum(x.region == "L" for x in anat.vertebrae))
        ),
        "n_rib_pairs": int(sum(x.rib for x in anat.vertebrae)),
        "transitional": anat.variants.get("transitional"),
        "locator_z_mm": locator_z,
        "scan_mm": (float(zs[0]), float(zs[-1])),
        "slice_thickness_mm": thk,
        "pixel_mm": px,
    }
    return SpineCase(box, classes, instance, names, truth)
