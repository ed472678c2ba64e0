"""Rasterising a sampled :class:`~worker.phantom.anatomy.Anatomy` slice by slice.

Each axial slice is built as a soft-tissue class map (table, limbs, torso layers, organs),
turned into HU and tissue labels through per-patient look-up tables, then the bones are
alpha-composited on top and correlated noise is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core import labels as tl
from worker.phantom import anatomy as tc
from worker.phantom.anatomy import Anatomy, torso_section
from worker.phantom.primitives import BoneBuffers, SliceGrid

#: tissue class -> tissue label (core.labels). Arm tissue is left unlabelled, as in the usual
#: L3 analysis protocols that exclude the arms from the body-composition areas.
LABEL_OF_CLASS = np.zeros(tc.N_CLASSES, dtype=np.uint8)
LABEL_OF_CLASS[tc.MUSCLE] = tl.SMA
LABEL_OF_CLASS[tc.IMAT] = tl.IMAT
LABEL_OF_CLASS[tc.VAT] = tl.VAT
LABEL_OF_CLASS[tc.SAT] = tl.SAT


@dataclass
class RenderGrid:
    """Sampling of the phantom: body-frame coordinates of every voxel centre (mm).

    xs : (cols,), ys : (rows,), zs : (n_slices,) ascending; pixel_mm and thickness_mm.
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    pixel_mm: float
    thickness_mm: float


class _Index:
    """Primitives sorted for a fast 'active at z' query."""

    def __init__(self, items: list, key=lambda p: p) -> None:
        self.items = items
        self.zmin = np.array([key(p).zmin for p in items], dtype=np.float64)
        self.zmax = np.array([key(p).zmax for p in items], dtype=np.float64)

    def active(self, z: float) -> list:
        if not self.items:
            return []
        idx = np.nonzero((self.zmin <= z) & (self.zmax >= z))[0]
        return [self.items[i] for i in idx]


def _superellipse(
    xs: np.ndarray,
    ys: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b_ant: float,
    b_post: float,
    p: float,
) -> np.ndarray:
    """(rows, cols) bool mask of ``|dx/a|^p + |dy/b|^p <= 1`` with b = b_ant above cy."""
    u = np.abs((xs - cx) / max(a, 1e-3)) ** p
    dy = ys - cy
    b = np.where(dy < 0, max(b_ant, 1e-3), max(b_post, 1e-3))
    v = np.abs(dy / b) ** p
    return (v[:, None] + u[None, :]) <= 1.0


def _noise_bank(
    rng: np.random.Generator, n: int, rows: int, cols: int, sigma_px: float
) -> np.ndarray:
    """(n, rows + 32, cols + 32) float32 Gaussian noise smoothed by ``sigma_px``, unit std."""
    bank = rng.standard_normal((n, rows + 32, cols + 32), dtype=np.float32)
    if sigma_px > 0.3:
        for i in range(n):
            bank[i] = ndimage.gaussian_filter(bank[i], sigma_px)
        bank /= bank.std() + 1e-6
    return bank


def render(
    anat: Anatomy,
    grid: RenderGrid,
    rng: np.random.Generator,
    *,
    with_labels: bool = True,
    mip_only: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render the phantom on ``grid``.

    Parameters
    ----------
    anat : the sampled patient.
    grid : voxel centres (body frame, mm).
    rng : randomness for noise and texture (deterministic for a seed).
    with_labels : also return the (z, y, x) uint8 tissue labels (core.labels values).
    mip_only : return only the frontal maximum over y per slice, shape (z, 1, x), without
        keeping the volume (the fast path for training the locator).

    Returns
    -------
    hu : (z, y, x) float32 HU, or (z, 1, x) with ``mip_only``.
    labels : (z, y, x) uint8 or None.
    """
    xs, ys, zs = grid.xs, grid.ys, grid.zs
    rows, cols, nz = len(ys), len(xs), len(zs)
    sg = SliceGrid(xs, ys, grid.pixel_mm, grid.thickness_mm)
    hu_lut = anat.hu.astype(np.float32)
    out = np.empty((nz, 1 if mip_only else rows, cols), dtype=np.float32)
    lab = np.zeros((nz, rows, cols), dtype=np.uint8) if (with_labels and not mip_only) else None

    bones = _Index(anat.bones)
    before = _Index(anat.soft_before, key=lambda s: s.shape)
    after = _Index(anat.soft_after, key=lambda s: s.shape)

    # static per-phantom maps: table cross-section, diaphragm dome heights, noise banks
    base = np.zeros((rows, cols), dtype=np.uint8)
    if anat.table is not None:
        t = anat.table
        ytop = t["y_top"] + t["curvature"] * 0.0 - 0.0 * xs
        ytop = t["y_top"] - t["curvature"] * np.square(
            np.clip(xs, -t["half_width"], t["half_width"]) / 10.0
        )
        inside_x = np.abs(xs) <= t["half_width"]
        dy = ys[:, None] - ytop[None, :]
        band = (dy >= 0) & (dy <= t["thickness"]) & inside_x[None, :]
        base[band] = tc.TABLE_CORE
        shell = band & ((dy <= t["shell"]) | (dy >= t["thickness"] - t["shell"]))
        base[shell] = tc.TABLE_SHELL
        if t["pad"] > 0:
            pad = (dy < 0) & (dy >= -t["pad"]) & (np.abs(xs) <= t["half_width"] - 20)[None, :]
            base[pad] = tc.PAD
    dome = _dome_map(anat, xs, ys)
    z_dome_min = float(dome.min())
    bank = _noise_bank(rng, 6, rows, cols, 0.6 * max(1.0, 0.8 / grid.pixel_mm))
    imat_bank = _noise_bank(rng, 3, rows, cols, max(0.7, 1.5 / grid.pixel_mm))
    imat_thr = float(np.quantile(imat_bank[0, ::4, ::4], 1.0 - anat.imat_fraction))
    vessel_thr = 2.0
    offs = rng.integers(0, 32, size=(nz, 4))
    pick = rng.integers(0, 6, size=nz)
    lung_vessel_hu = float(anat.hu[tc.BLOOD]) * 0.6

    lm = anat.landmarks
    z_torso_lo = lm["perineum"]
    z_torso_hi = anat.vertebra("T1").z1 + 18 * anat.scale
    p_out = float(
        anat.extra.setdefault("p_out", 2.0 + 0.8 * min(1.0, anat.extra["sat"]["lat"] / 40))
    )
    liver_tip = float(anat.extra["liver_tip_z"])
    liver_left = float(anat.extra["liver_left_x"])
    bufs = BoneBuffers(np.zeros((rows, cols), np.float32), np.zeros((rows, cols), np.float32))
    kk = anat.scale
    rectus_gap = float(anat.extra.get("rectus_gap_mm", 0.0))
    linea_alba = float(anat.extra.get("linea_alba_mm", 0.0))
    z_diastasis_top = anat.vertebra("L1").z1  # the gap from the top of L1 down

    for i, z in enumerate(zs):
        z = float(z)
        cmap = base.copy()
        for part in before.active(z):
            part.shape.draw_class(z, sg, cmap, part.cls)
        cavity = abdomen = None
        if z_torso_lo <= z <= z_torso_hi:
            sec = torso_section(anat, z)
            yc = sec["yc"]
            outer = _superellipse(xs, ys, 0.0, yc, sec["a_o"], sec["b_oa"], sec["b_op"], p_out)
            cmap[outer] = tc.SKIN
            sk = 1.5
            cmap[
                _superellipse(
                    xs, ys, 0.0, yc, sec["a_o"] - sk, sec["b_oa"] - sk, sec["b_op"] - sk, p_out
                )
            ] = tc.SAT
            inner = _superellipse(xs, ys, 0.0, yc, sec["a_i"], sec["b_ia"], sec["b_ip"], 2.2)
            cmap[inner] = tc.MUSCLE
            cavity = _superellipse(xs, ys, 0.0, yc, sec["a_c"], sec["b_ca"], sec["b_cp"], 2.0)
            cmap[cavity] = tc.VAT
            if rectus_gap > 0 and z <= z_diastasis_top:
                _rectus_diastasis(cmap, inner & ~cavity, xs, ys, sec, rectus_gap, linea_alba)
            sx = anat.spine_x(z)
            sy = sec["spine_y"]
            hw = 48.0 * kk * float(anat.extra["mus"]) ** 0.5
            box = (
                (np.abs(xs - sx) < hw)[None, :] & (ys > sy + 0.5 * sec["vb_d"] - 6)[:, None] & inner
            )
            cmap[box] = tc.MUSCLE
            cavity &= ~box
            if z > z_dome_min:
                thor = cavity & (dome < z)
                med_hw = _mediastinum_hw(anat, z)
                med = (
                    thor
                    & (np.abs(xs - sx) < med_hw)[None, :]
                    & (ys < sy + 0.5 * sec["vb_d"])[:, None]
                )
                lung = thor & ~med
                cmap[lung] = tc.LUNG
                abdomen = cavity & ~thor
            else:
                abdomen = cavity
            # liver: right upper quadrant under the right dome
            if z > liver_tip:
                zr = anat.dome["right"]
                f = float(np.clip((z - liver_tip) / max(zr - liver_tip, 1.0), 0.0, 1.0))
                x_lim = sec["a_c"] * (-0.35 + (liver_left + 0.35) * f**0.7)
                z_low = liver_tip + 0.35 * (xs + sec["a_c"])  # the lateral right tip is lowest
                liver = (
                    abdomen
                    & ((xs < x_lim) & (z > z_low))[None, :]
                    & (ys < sy + 0.5 * sec["vb_d"] + 25)[:, None]
                )
                cmap[liver] = tc.LIVER
                abdomen = abdomen & ~liver
        for part in after.active(z):
            allow = None
            if part.clip == "abdomen":
                if abdomen is None:
                    continue
                allow = abdomen
            elif part.clip == "cavity":
                if cavity is None:
                    continue
                allow = cavity
            part.shape.draw_class(z, sg, cmap, part.cls, allow)

        o = offs[i]
        if anat.imat_fraction > 0:
            im = imat_bank[i % 3, o[2] : o[2] + rows, o[3] : o[3] + cols]
            cmap[(cmap == tc.MUSCLE) & (im > imat_thr)] = tc.IMAT
        hu = hu_lut[cmap]
        lung_px = cmap == tc.LUNG
        if lung_px.any():
            ves = bank[(pick[i] + 3) % 6, o[1] : o[1] + rows, o[0] : o[0] + cols] > vessel_thr
            hu[lung_px & ves] = lung_vessel_hu
        bufs.alpha.fill(0.0)
        bufs.bone.fill(0.0)
        for b in bones.active(z):
            b.draw_bone(z, sg, bufs)
        hu *= 1.0 - bufs.alpha
        hu += bufs.bone
        if anat.noise_hu > 0:
            hu += anat.noise_hu * bank[pick[i], o[0] : o[0] + rows, o[1] : o[1] + cols]
        np.clip(hu, -1024.0, 3071.0, out=hu)
        if mip_only:
            out[i, 0] = hu.max(axis=0)
        else:
            out[i] = hu
        if lab is not None:
            li = LABEL_OF_CLASS[cmap]
            li[bufs.alpha > 0.5] = 0
            lab[i] = li
    return out, lab


def _rectus_diastasis(
    cmap: np.ndarray,
    ring: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    sec: dict[str, float],
    gap_mm: float,
    linea_alba_mm: float,
) -> None:
    """Open the muscle ring in the anterior midline: rectus diastasis (in place on ``cmap``).

    The ring's pixels within ``gap_mm / 2`` of the midline (x = 0) in front of the torso
    centre become visceral fat (the fat between the recti is inside the abdominal wall line,
    continuous with the preperitoneal and omental fat); the outer ``linea_alba_mm`` of them
    (the stretched linea alba at the level of the recti's outer surface) become fibrous
    tissue with the skin's class (soft-tissue HU, label 0).

    Parameters
    ----------
    cmap : (rows, cols) uint8 class map, modified in place.
    ring : (rows, cols) bool, the muscle wall (its outer surface minus the cavity).
    xs, ys : (cols,), (rows,) body-frame coordinates of the pixel centres (mm).
    sec : :func:`~worker.phantom.anatomy.torso_section` at this slice.
    gap_mm, linea_alba_mm : distance between the recti and thickness of the linea alba (mm).
    """
    split = ring & (np.abs(xs) < 0.5 * gap_mm)[None, :] & (ys < sec["yc"])[:, None]
    cmap[split] = tc.VAT
    if linea_alba_mm > 0:
        below = _superellipse(
            xs,
            ys,
            0.0,
            sec["yc"],
            sec["a_i"] - linea_alba_mm,
            sec["b_ia"] - linea_alba_mm,
            sec["b_ip"] - linea_alba_mm,
            2.2,
        )
        cmap[split & ~below] = tc.SKIN


def _mediastinum_hw(anat: Anatomy, z: float) -> float:
    """Half-width (mm) of the mediastinum between the lungs at ``z``."""
    k = anat.scale
    t4 = anat.vertebra("T4").zm
    return float(np.interp(z, [anat.dome["left"], t4, t4 + 80 * k], [45 * k, 22 * k, 28 * k]))


def _dome_map(anat: Anatomy, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(rows, cols) z (mm) of the diaphragm above each (x, y): lungs lie above it.

    Each hemidiaphragm is a dome, highest mid-clavicular, descending laterally and
    posteriorly into the costophrenic recesses (down to about T12-L1 posteriorly).
    """
    k = anat.scale
    zr, zl = anat.dome["right"], anat.dome["left"]
    sec = torso_section(anat, zr - 40 * k)
    a = sec["a_c"]
    top = np.where(xs < 0, zr, zl)
    lat = np.square(np.clip((np.abs(xs) - 0.45 * a) / (0.55 * a), -1.0, 1.5))
    zx = top - 45 * k * lat
    post = np.clip((ys - sec["yc"]) / max(sec["b_cp"], 1.0), 0.0, 1.5)
    ant = np.clip((sec["yc"] - sec["b_ca"] * 0.2 - ys) / max(sec["b_ca"], 1.0), 0.0, 1.0)
    return (zx[None, :] - 55 * k * np.square(post)[:, None] - 25 * k * ant[:, None]).astype(
        np.float32
    )
