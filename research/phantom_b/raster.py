"""Style B rasteriser: a bone "depth" field (mm inside the nearest bone surface) built from
implicit solids and stamped tubes, soft tissue from harmonic outlines and ellipsoids, texture
from up-sampled coarse noise fields, partial volume by averaging sub-slices, noise with a
ramp-Gaussian power spectrum (a reconstruction kernel) and a Gaussian point spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from research.phantom_b.body import Body, Solid, Tube
from research.phantom_b.skeleton import torso_centre_y

#: Sub-slice step (mm) for the partial-volume average of a thick slice.
SUB_STEP_MM = 1.25


@dataclass
class Grid:
    """Voxel centres in the body frame (mm): xs (cols,), ys (rows,), zs (sub-slices,)."""

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    px: float

    @property
    def dz(self) -> float:
        return float(self.zs[1] - self.zs[0]) if len(self.zs) > 1 else 1.0

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels inside [lo, hi] ((x, y, z) mm), or None."""
        out = []
        for ax, a, b in ((self.zs, lo[2], hi[2]), (self.ys, lo[1], hi[1]), (self.xs, lo[0], hi[0])):
            i0 = int(np.searchsorted(ax, a, "left"))
            i1 = int(np.searchsorted(ax, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]


def _solid_depth(s: Solid, gx: np.ndarray, gy: np.ndarray, gz: np.ndarray) -> np.ndarray:
    """Depth inside the solid (mm, > 0 inside) at broadcast coordinates."""
    p = s.params
    if s.kind == "rbox":
        h = max(p["z1"] - p["z0"], 1e-3)
        t = np.clip((gz - p["z0"]) / h, 0.0, 1.0)
        shrink = 1.0 - p["waist"] * (1.0 - (2.0 * t - 1.0) ** 2)
        hw, hd = p["hw"] * shrink, p["hd"] * shrink
        rc = min(p["corner"], p["hw"], p["hd"])
        qx = np.abs(gx - p["x"]) - (hw - rc)
        qy = np.abs(gy - p["y"]) - (hd - rc)
        out = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
        sd = np.maximum(out - rc, np.maximum(p["z0"] - gz, gz - p["z1"]))
        return -sd
    if s.kind == "ball":
        return p["r"] - np.sqrt((gx - p["x"]) ** 2 + (gy - p["y"]) ** 2 + (gz - p["z"]) ** 2)
    if s.kind == "wedge":
        length = p["z_top"] - p["z_bot"]
        t = np.clip((p["z_top"] - gz) / length, 0.0, 1.0)
        hw = p["w_top"] + (p["w_bot"] - p["w_top"]) * t**0.7
        hd = p["d_top"] + (p["d_bot"] - p["d_top"]) * t
        yc = p["y"] + p["tilt"] * (p["z_top"] - gz)
        e = np.minimum(hw - np.abs(gx - p["x"]), hd - np.abs(gy - yc))
        return np.minimum(e, np.minimum(gz - p["z_bot"], p["z_top"] - gz))
    if s.kind == "wing":
        sgn = p["side"]
        dx = sgn * gx - p["xc"]
        dy = gy - p["yc"]
        dist = np.hypot(dx, dy)
        psi = np.arctan2(dy, dx)
        f = np.clip((gz - p["z_bot"]) / (p["z_top"] - p["z_bot"]), 0.0, 1.0)
        radius = p["r_bot"] + (p["r_top"] - p["r_bot"]) * np.sqrt(f)
        top = p["z_top"] - p["sag"] * ((psi - p["psi_peak"]) / 1.1) ** 2
        e = p["thick"] / 2 - np.abs(dist - radius)
        e = np.minimum(e, (psi - p["psi_ant"]) * dist)
        e = np.minimum(e, (p["psi_post"] - psi) * dist)
        return np.minimum(e, np.minimum(gz - p["z_bot"], top - gz))
    raise ValueError(f"unknown solid {s.kind!r}")


def _solid_bbox(s: Solid) -> tuple[np.ndarray, np.ndarray]:
    p = s.params
    if s.kind == "rbox":
        m = max(p["hw"], p["hd"])
        return (
            np.array([p["x"] - m, p["y"] - m, p["z0"]]),
            np.array([p["x"] + m, p["y"] + m, p["z1"]]),
        )
    if s.kind == "ball":
        c, r = np.array([p["x"], p["y"], p["z"]]), p["r"]
        return c - r, c + r
    if s.kind == "wedge":
        w, y1 = p["w_top"], p["y"] + p["tilt"] * (p["z_top"] - p["z_bot"])
        return (
            np.array([-w, p["y"] - p["d_top"], p["z_bot"]]),
            np.array([w, y1 + p["d_top"], p["z_top"]]),
        )
    r = p["r_top"] + p["thick"]
    x0 = p["side"] * p["xc"]
    return (
        np.array([x0 - r, p["yc"] - r, p["z_bot"]]),
        np.array([x0 + r, p["yc"] + r, p["z_top"]]),
    )


def bone_depth(tubes: list[Tube], solids: list[Solid], grid: Grid) -> np.ndarray:
    """(z, y, x) float32 depth (mm) inside the nearest bone: > 0 inside, -50 far outside."""
    nz, ny, nx = len(grid.zs), len(grid.ys), len(grid.xs)
    depth = np.full((nz, ny, nx), -50.0, np.float32)
    for s in solids:
        lo, hi = _solid_bbox(s)
        box = grid.box(lo - grid.px, hi + grid.px)
        if box is None:
            continue
        gz = grid.zs[box[0]][:, None, None]
        gy = grid.ys[box[1]][None, :, None]
        gx = grid.xs[box[2]][None, None, :]
        np.maximum(depth[box], _solid_depth(s, gx, gy, gz).astype(np.float32), out=depth[box])
    _stamp_tubes(depth, tubes, grid)
    return depth


def _resample(points: np.ndarray, radius: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    t = np.linspace(0.0, s[-1], n)
    pts = np.stack([np.interp(t, s, points[:, i]) for i in range(3)], axis=1)
    return pts, np.interp(t, s, radius)


def _stamp_tubes(depth: np.ndarray, tubes: list[Tube], grid: Grid) -> None:
    """Union of spheres along every tube (dense samples), written with ``np.maximum.at``."""
    if not tubes:
        return
    lo = np.array([grid.xs[0], grid.ys[0], grid.zs[0]])
    hi = np.array([grid.xs[-1], grid.ys[-1], grid.zs[-1]])
    sp = np.array([grid.px, grid.px, grid.dz])
    shape = np.array([len(grid.xs), len(grid.ys), len(grid.zs)])
    flat = depth.reshape(-1)
    for tube in tubes:
        # spheres 0.3 r apart: the union's surface is within 0.02 r of the tube's
        step = float(np.clip(0.3 * tube.radius.min(), 0.3, 1.5))
        pts, rad = _resample(tube.points, tube.radius, step)
        rmax = float(rad.max())
        keep = np.all((pts >= lo - rmax) & (pts <= hi + rmax), axis=1)
        pts, rad = pts[keep], rad[keep]
        if not len(pts):
            continue
        half = np.ceil(rmax / sp).astype(int) + 1
        off = np.stack(
            np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), axis=-1
        ).reshape(-1, 3)
        off = off[np.linalg.norm(off * sp, axis=1) <= rmax + 2.0 * grid.px]
        n_chunk = max(1, 1_500_000 // len(off))
        for c0 in range(0, len(pts), n_chunk):
            p, r = pts[c0 : c0 + n_chunk], rad[c0 : c0 + n_chunk]
            idx = np.rint((p - lo) / sp).astype(np.int64)[:, None, :] + off[None]  # x, y, z
            ok = np.all((idx >= 0) & (idx < shape), axis=2)
            centre = lo + idx * sp
            e = r[:, None] - np.linalg.norm(centre - p[:, None, :], axis=2)
            ok &= e > -2.0 * grid.px
            ii = idx[ok]
            lin = (ii[:, 2] * shape[1] + ii[:, 1]) * shape[0] + ii[:, 0]
            np.maximum.at(flat, lin, e[ok].astype(np.float32))


def _coarse_field(rng: np.random.Generator, grid: Grid, cell_mm: float) -> np.ndarray:
    """Unit-variance smooth noise on a coarse lattice of ``cell_mm`` covering the grid."""
    shape = [int(np.ceil((ax[-1] - ax[0]) / cell_mm)) + 3 for ax in (grid.zs, grid.ys, grid.xs)]
    f = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    return (f / (f.std() + 1e-6)).astype(np.float32)


def _interp_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """(len(coords), n) weights of linear interpolation at fractional indices ``coords``."""
    c = np.clip(coords, 0.0, n - 1.000001)
    i0 = np.floor(c).astype(int)
    w = np.zeros((len(c), n), np.float32)
    rows = np.arange(len(c))
    w[rows, i0] = 1.0 - (c - i0)
    w[rows, i0 + 1] += c - i0
    return w


class _Field:
    """A coarse noise field up-sampled in-plane once; :meth:`at` interpolates it in z."""

    def __init__(self, coarse: np.ndarray, grid: Grid, cell_mm: float) -> None:
        cz, cy, cx = coarse.shape
        wy = _interp_matrix((grid.ys - grid.ys[0]) / cell_mm + 1, cy)
        wx = _interp_matrix((grid.xs - grid.xs[0]) / cell_mm + 1, cx)
        f = (coarse.reshape(cz * cy, cx) @ wx.T).reshape(cz, cy, -1)  # (cz, cy, nx)
        f = np.transpose(f, (0, 2, 1)).reshape(-1, cy) @ wy.T  # (cz * nx, ny)
        self.plane = np.ascontiguousarray(
            np.transpose(f.reshape(cz, len(grid.xs), len(grid.ys)), (0, 2, 1))
        ).reshape(cz, -1)
        self.wz = _interp_matrix((grid.zs - grid.zs[0]) / cell_mm + 1, cz)
        self.shape = (len(grid.ys), len(grid.xs))

    def at(self, zsl: slice) -> np.ndarray:
        """(z, y, x) float32 values at the sub-slices ``zsl``."""
        return (self.wz[zsl] @ self.plane).reshape(-1, *self.shape)


def _ellipsoid(gx, gy, gz, c, r) -> np.ndarray:
    return ((gx - c[0]) / r[0]) ** 2 + ((gy - c[1]) / r[1]) ** 2 + ((gz - c[2]) / r[2]) ** 2 <= 1.0


def soft_tissue(body: Body, grid: Grid, rng: np.random.Generator, chunk: int = 24) -> np.ndarray:
    """(z, y, x) float32 HU of the soft tissues (no bone), air outside the body."""
    hu_t = body.hu
    k, kw = body.k, body.kw
    nz, ny, nx = len(grid.zs), len(grid.ys), len(grid.xs)
    out = np.full((nz, ny, nx), -1000.0, np.float32)
    bowel_f = _Field(_coarse_field(rng, grid, 9.0), grid, 9.0)
    gas_f = _Field(_coarse_field(rng, grid, 6.0), grid, 6.0)
    vessel_f = _Field(_coarse_field(rng, grid, 3.5), grid, 3.5)
    h2, h3, ph3 = body.harmonics
    z_per = body.femoral_z - 55.0 * k
    lv1 = body.level("L1")
    bif = body.levels[1].zm + rng.uniform(-10, 10)  # aortic bifurcation near L4
    y_fem = float(body.extra["y_fem"])
    bowel_q = np.quantile(rng.standard_normal(4000), 0.65 - min(0.25, body.extra["vat"] / 200))
    ytab = None
    if body.table is not None:
        zz = np.linspace(grid.zs[0], grid.zs[-1], 50)
        back = torso_centre_y(body, zz) + body.core_b(zz) + 0.8 * body.fat(zz)
        ytab = float(np.max(back)) + 2.0
    gx = grid.xs[None, None, :].astype(np.float32)
    gy = grid.ys[None, :, None].astype(np.float32)

    def col(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, np.float32)[:, None, None]

    for c0 in range(0, nz, chunk):
        zsl = slice(c0, min(nz, c0 + chunk))
        z = grid.zs[zsl]
        gz = col(z)
        a, b = col(body.core_a(z)), col(body.core_b(z))
        fat, wall = col(body.fat(z)), col(body.wall(z))
        yc = col(torso_centre_y(body, z))
        legs = gz < z_per
        xe = np.where(legs, np.abs(gx) - 0.5 * a, gx)
        ae = np.where(legs, 0.48 * a, a)
        v = (gy - yc) / b
        uu = xe / ae
        rho = np.sqrt(uu * uu + v * v) + 1e-6
        c, s_ = uu / rho, v / rho  # cos, sin of the polar angle, without arctan2
        cos3 = c * (4 * c * c - 3)
        sin3 = s_ * (3 - 4 * s_ * s_)
        f = 1.0 + h2 * (c * c - s_ * s_) + h3 * (cos3 * np.cos(ph3) - sin3 * np.sin(ph3))
        bo = b + fat * np.where(gy < yc, 1.25, 0.8)
        ao = ae + fat
        r_out = np.hypot(xe / ao, (gy - yc) / bo) / f
        r_skin = np.hypot(xe / np.maximum(ao - 2.0, 1), (gy - yc) / np.maximum(bo - 2.0, 1)) / f
        r_core = rho / f
        r_cav = np.hypot(xe / np.maximum(ae - wall, 5), (gy - yc) / np.maximum(b - wall, 5)) / f
        hu = out[zsl]
        hu[r_out <= 1] = hu_t["skin"]
        hu[r_skin <= 1] = hu_t["fat"]
        hu[r_core <= 1] = hu_t["muscle"]
        sx = col(body.spine_x(z))
        sy = col(body.spine_y(z))
        near_spine = (gy > sy - 22 * kw) & (np.abs(gx - sx) < 48 * kw)
        cav = (r_cav <= 1) & ~legs & ~near_spine
        # thorax above the diaphragm domes (lower laterally and posteriorly)
        dome = (
            np.where(gx < 0, body.dome_right, body.dome_left)
            - 45 * k * np.clip(np.abs(gx) / a, 0, 1.3) ** 2
            - 55 * k * np.clip((gy - yc) / b, 0, 1.2) ** 2
        )
        thorax = cav & (gz > dome)
        abd = cav & ~thorax
        med_hw = np.interp(z, [body.dome_left, body.level("T4").zm], [42 * k, 24 * k])
        med = thorax & (np.abs(gx - sx) < med_hw[:, None, None]) & (gy < sy)
        lung = thorax & ~med
        hu[med] = hu_t["fat"]
        heart = med & _ellipsoid(
            gx, gy, gz, (15 * k, 0, body.dome_left + 55 * k), (62 * kw, 1e9, 60 * k)
        )
        hu[heart] = 0.5 * (hu_t["muscle"] + hu_t["blood"])
        hu[lung] = hu_t["lung"]
        vf = vessel_f.at(zsl)
        hu[lung & (vf > 1.6)] = 0.55 * hu_t["blood"]
        # abdomen: fat with bowel, gas and contrast from the noise fields
        hu[abd] = hu_t["fat"]
        bf = bowel_f.at(zsl)
        gf = gas_f.at(zsl)
        bowel = abd & (bf > bowel_q)
        hu[bowel] = hu_t["fluid"] + 20.0
        hu[bowel & (gf > 1.1)] = hu_t["gas"]
        hu[bowel & (gf < -1.4)] = hu_t["oral"]
        # organs
        lt = body.dome_right
        liver = abd & _ellipsoid(
            gx, gy, gz, (-0.42 * a, yc, lt - 65 * k), (0.6 * a, 0.9 * b, 85 * k)
        )
        hu[liver] = hu_t["organ"]
        spleen = abd & _ellipsoid(
            gx,
            gy,
            gz,
            (0.62 * a, yc + 0.45 * b, body.dome_left - 45 * k),
            (30 * kw, 45 * kw, 50 * k),
        )
        hu[spleen] = hu_t["organ"] - 5
        for s in (-1.0, 1.0):
            kid = _ellipsoid(
                gx,
                gy,
                gz,
                (sx + s * 62 * kw, sy + 8, lv1.z0 - (5 if s > 0 else 15) * k),
                (27 * kw, 24 * kw, 55 * k),
            )
            hu[(r_cav <= 1) & kid] = hu_t["organ"] + 15
        ya = sy - 26 * kw
        aorta = ((gx - sx - 16 * kw) ** 2 + (gy - ya) ** 2 <= (11 * kw) ** 2) & (gz > bif)
        aorta &= gz < body.level("T5").zm
        hu[aorta] = hu_t["blood"]
        f_il = np.clip((bif - gz) / max(bif - body.femoral_z, 1), 0, 1)
        for s in (-1.0, 1.0):
            xi = sx + 16 * kw + f_il * (s * 0.75 * body.femoral_x - sx - 16 * kw)
            yi = ya + f_il * (y_fem - 12 - ya)
            il = (
                ((gx - xi) ** 2 + (gy - yi) ** 2 <= (6.5 * kw) ** 2)
                & (gz <= bif)
                & (gz > body.femoral_z)
            )
            hu[il] = hu_t["blood"]
        blad = _ellipsoid(
            gx, gy, gz, (0, y_fem - 30 * kw, body.femoral_z + 5 * k), (45 * kw, 35 * kw, 40 * k)
        )
        hu[(r_cav <= 1) & blad & ~legs] = hu_t["fluid"]
        # arms down: soft cylinders around the humerus and forearm axes, outside the torso
        for s in (-1, 1):
            pts = body.extra.get(f"arm{s}_pts")
            if pts is None:
                continue
            pts = np.asarray(pts)
            order = np.argsort(pts[:, 2])
            ax = np.interp(z, pts[order, 2], pts[order, 0])[:, None, None]
            ay = np.interp(z, pts[order, 2], pts[order, 1])[:, None, None]
            inside_z = ((z >= pts[:, 2].min()) & (z <= pts[:, 2].max()))[:, None, None]
            d = np.hypot(gx - ax, gy - ay)
            free = hu <= -990
            hu[free & inside_z & (d < 36 * kw + 0.5 * fat)] = hu_t["fat"]
            hu[free & inside_z & (d < 30 * kw)] = hu_t["muscle"]
        if ytab is not None:
            tab = (
                (gy >= ytab)
                & (gy <= ytab + body.table["thick"])
                & (np.abs(gx) < body.table["half"])
            )
            hu[tab & (hu <= -990)] = body.table["hu"]
    return out


def composite(body: Body, grid: Grid, rng: np.random.Generator, n_sub: int) -> np.ndarray:
    """(n_slices, y, x) float32 HU: soft tissue, discs and bone, sub-slices averaged in
    groups of ``n_sub``, point spread and kernel-shaped noise added."""
    hu = soft_tissue(body, grid, rng)
    # discs: rounded boxes between bodies, soft-tissue HU
    for lo_lv, hi_lv in zip(body.levels[:-1], body.levels[1:], strict=True):
        s = Solid(
            "rbox",
            {
                "z0": lo_lv.z1,
                "z1": hi_lv.z0,
                "x": 0.5 * (lo_lv.x + hi_lv.x),
                "y": 0.5 * (lo_lv.y + hi_lv.y),
                "hw": 0.48 * lo_lv.width,
                "hd": 0.48 * lo_lv.depth,
                "corner": 8.0,
                "waist": -0.05,
            },
        )
        lo, hi = _solid_bbox(s)
        box = grid.box(lo, hi)
        if box is None:
            continue
        e = _solid_depth(
            s,
            grid.xs[box[2]][None, None, :],
            grid.ys[box[1]][None, :, None],
            grid.zs[box[0]][:, None, None],
        )
        hu[box][e > 0] = body.hu["disc"]
    depth = bone_depth(body.tubes, body.solids, grid)
    occ = np.clip(depth / grid.px + 0.5, 0.0, 1.0)
    shell = rng.uniform(1.2, 2.2)
    w_cort = np.clip((shell - depth) / grid.px + 0.5, 0.0, 1.0) * min(
        1.0, max(0.35, shell / grid.px)
    )
    trab = np.empty_like(hu)
    tf = _Field(_coarse_field(rng, grid, 4.0), grid, 4.0)
    for c0 in range(0, len(grid.zs), 64):
        zsl = slice(c0, min(len(grid.zs), c0 + 64))
        trab[zsl] = tf.at(zsl)
    canc = body.hu["cancellous"] * (1.0 + 0.12 * trab)
    bone = canc + (body.hu["cortical"] - canc) * w_cort
    hu = hu * (1.0 - occ) + bone * occ
    n = len(grid.zs) // n_sub
    hu = hu[: n * n_sub].reshape(n, n_sub, len(grid.ys), len(grid.xs)).mean(axis=1)
    sig = body.psf_mm / grid.px
    if sig > 0.25:
        hu = ndimage.gaussian_filter(hu, (0.0, sig, sig))
    hu += body.noise_sd * _kernel_noise(rng, hu.shape, grid.px, body.kernel_cutoff)
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32)


def _kernel_noise(
    rng: np.random.Generator, shape: tuple[int, ...], px: float, cutoff: float
) -> np.ndarray:
    """Unit-variance noise per slice with power spectrum |f| exp(-(f / cutoff)^2) (a CT
    ramp filter apodised by a Gaussian; cycles per mm)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[1], px)[:, None]
    fx = np.fft.rfftfreq(shape[2], px)[None, :]
    f = np.hypot(fy, fx)
    filt = np.sqrt(f * np.exp(-((f / cutoff) ** 2))).astype(np.float32)
    noise = sfft.irfft2(sfft.rfft2(white, axes=(1, 2)) * filt, s=shape[1:], axes=(1, 2))
    return (noise / (noise.std() + 1e-6)).astype(np.float32)
