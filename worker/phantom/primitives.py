"""Rasterising analytic shapes into one axial slice.

Every primitive works in the phantom's body frame (mm): x = patient right -> left,
y = anterior -> posterior, z = inferior -> superior. A slice is the plane ``z = const`` sampled
on 1-D column positions ``xs`` (cols,) and row positions ``ys`` (rows,), both ascending.

Bones are drawn into two accumulators, ``alpha`` (coverage 0..1, anti-aliased over one pixel)
and ``bone`` (coverage x HU), composited over the soft tissue by the renderer; soft tissue is
drawn as integer tissue classes into a class map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SliceGrid:
    """Sampling grid of one axial slice.

    Attributes
    ----------
    xs : (cols,) column centres in mm (body frame), ascending.
    ys : (rows,) row centres in mm (body frame), ascending.
    pixel_mm : in-plane pixel size (mm), the anti-aliasing width.
    thickness_mm : slice thickness (mm); partial volume of thin cortices along z.
    """

    xs: np.ndarray
    ys: np.ndarray
    pixel_mm: float
    thickness_mm: float

    def window(
        self, x0: float, x1: float, y0: float, y1: float
    ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """Row/col slices and coordinates of the pixels inside a bounding box (mm)."""
        c0 = int(np.searchsorted(self.xs, x0))
        c1 = int(np.searchsorted(self.xs, x1, side="right"))
        r0 = int(np.searchsorted(self.ys, y0))
        r1 = int(np.searchsorted(self.ys, y1, side="right"))
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1), self.xs[c0:c1], self.ys[r0:r1]


@dataclass
class BoneBuffers:
    """Per-slice bone accumulators, both (rows, cols) float32."""

    alpha: np.ndarray
    bone: np.ndarray

    def put(self, rs: slice, cs: slice, alpha: np.ndarray, hu: np.ndarray) -> None:
        """Max-composite a patch of coverage ``alpha`` and HU ``hu`` into the buffers."""
        a = self.alpha[rs, cs]
        b = self.bone[rs, cs]
        np.maximum(a, alpha, out=a)
        np.maximum(b, alpha * hu, out=b)


def _fill(
    cmap: np.ndarray, rs: slice, cs: slice, mask: np.ndarray, value: int, allow: np.ndarray | None
) -> None:
    """Set ``cmap[rs, cs]`` to ``value`` where ``mask`` (and ``allow[rs, cs]``) hold."""
    if allow is not None:
        mask = mask & allow[rs, cs]
    cmap[rs, cs][mask] = value


def _cover(inside_mm: np.ndarray, soft_mm: float) -> np.ndarray:
    """Coverage 0..1 from a signed depth inside a surface (mm), linear over ``soft_mm``."""
    return np.clip(inside_mm / soft_mm + 0.5, 0.0, 1.0)


def _shell_hu(
    depth_mm: np.ndarray, cortical: float, cancellous: float, shell_mm: float, blur_mm: float
) -> np.ndarray:
    """HU inside a bone at ``depth_mm`` below its surface: a cortex over cancellous bone.

    The cortex of thickness ``shell_mm`` is seen through a detector of size ``blur_mm``: a
    cortex thinner than a pixel is averaged with the cancellous bone (partial volume).
    """
    amp = min(1.0, shell_mm / max(blur_mm, 1e-3))
    width = max(shell_mm, 0.5 * blur_mm)
    return cancellous + (cortical - cancellous) * amp * np.exp(-np.square(depth_mm / width))


@dataclass
class Capsule:
    """A tapered 3-D capsule (segment p0-p1 with radii r0, r1): ribs, processes, long bones.

    HU: ``cortical`` in a shell of ``shell_mm`` over ``cancellous`` (marrow) inside.
    """

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float
    cortical: float
    cancellous: float
    shell_mm: float = 1.5

    def __post_init__(self) -> None:
        self._a = np.asarray(self.p0, dtype=np.float64)
        self._d = np.asarray(self.p1, dtype=np.float64) - self._a
        self._dd = float(self._d @ self._d) or 1e-9
        rmax = max(self.r0, self.r1)
        lo = np.minimum(self.p0, self.p1) - rmax
        hi = np.maximum(self.p0, self.p1) + rmax
        self.zmin, self.zmax = float(lo[2]), float(hi[2])
        self._bbox = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))

    def _geometry(
        self, z: float, grid: SliceGrid
    ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """Bounding window, distance to the axis (mm) and local radius for slice ``z``."""
        if not (self.zmin <= z <= self.zmax):
            return None
        # restrict the box to the part of the segment within reach of this plane
        x0, x1, y0, y1 = self._bbox
        if abs(self._d[2]) > 1e-6:
            rmax = max(self.r0, self.r1)
            ta = (z - rmax - self._a[2]) / self._d[2]
            tb = (z + rmax - self._a[2]) / self._d[2]
            t0, t1 = np.clip(sorted((ta, tb)), 0.0, 1.0)
            pa = self._a + t0 * self._d
            pb = self._a + t1 * self._d
            x0 = min(pa[0], pb[0]) - rmax
            x1 = max(pa[0], pb[0]) + rmax
            y0 = min(pa[1], pb[1]) - rmax
            y1 = max(pa[1], pb[1]) + rmax
        win = grid.window(x0, x1, y0, y1)
        if win is None:
            return None
        rs, cs, xs, ys = win
        px = xs[None, :] - self._a[0]
        py = ys[:, None] - self._a[1]
        pz = z - self._a[2]
        t = np.clip((px * self._d[0] + py * self._d[1] + pz * self._d[2]) / self._dd, 0.0, 1.0)
        dx = px - t * self._d[0]
        dy = py - t * self._d[1]
        dz = pz - t * self._d[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        radius = self.r0 + t * (self.r1 - self.r0)
        return rs, cs, dist, radius

    def draw_bone(self, z: float, grid: SliceGrid, buf: BoneBuffers) -> None:
        """Rasterise into the bone accumulators."""
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, dist, radius = g
        depth = radius - dist
        alpha = _cover(depth, grid.pixel_mm)
        if not alpha.any():
            return
        hu = _shell_hu(
            depth, self.cortical, self.cancellous, self.shell_mm, max(grid.pixel_mm, 1.0)
        )
        buf.put(rs, cs, alpha, hu)

    def draw_class(
        self,
        z: float,
        grid: SliceGrid,
        cmap: np.ndarray,
        value: int,
        allow: np.ndarray | None = None,
    ) -> None:
        """Fill the class map with ``value`` inside the capsule (and inside ``allow``)."""
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, dist, radius = g
        _fill(cmap, rs, cs, dist <= radius, value, allow)


@dataclass
class Slab:
    """A superelliptic cylinder between z0 and z1: vertebral bodies, sternum, sacrum, discs.

    Cross-section ``|dx/a|^p + |dy/b|^p <= 1`` around a centre moving linearly from ``c0`` (at
    z0) to ``c1`` (at z1); the width narrows by ``waist`` at mid-height (vertebral waist) and
    the cortex is thicker (``endplate_mm``) at the end plates.

    The end plates are horizontal unless ``tilt0``/``tilt1`` (dz/dy, mm per mm) incline the
    bottom/top plane through its centre: positive raises the posterior edge (the S1 end
    plate facing forward and up, ANATOMY.md). ``b`` and ``b_top`` stay the axial
    half-depths; the slab then reaches ``|tilt| * b`` beyond z0/z1.
    """

    c0: tuple[float, float]
    c1: tuple[float, float]
    z0: float
    z1: float
    a: float
    b: float
    cortical: float
    cancellous: float
    shell_mm: float = 1.0
    endplate_mm: float = 1.5
    p: float = 2.4
    waist: float = 0.06
    a_top: float | None = None  # half-width at z1 (taper); default a
    b_top: float | None = None
    tilt0: float = 0.0  # dz/dy of the bottom plane (0: horizontal)
    tilt1: float = 0.0  # dz/dy of the top plane

    def _reach(self) -> float:
        return max(self.b, self.b_top if self.b_top is not None else self.b)

    @property
    def zmin(self) -> float:
        return self.z0 - abs(self.tilt0) * self._reach()

    @property
    def zmax(self) -> float:
        return self.z1 + abs(self.tilt1) * self._reach()

    def _geometry(self, z: float, grid: SliceGrid):
        if not (self.zmin <= z <= self.zmax):
            return None
        f = min(1.0, max(0.0, (z - self.z0) / max(self.z1 - self.z0, 1e-6)))
        cx = self.c0[0] + f * (self.c1[0] - self.c0[0])
        cy = self.c0[1] + f * (self.c1[1] - self.c0[1])
        a = self.a + f * ((self.a_top if self.a_top is not None else self.a) - self.a)
        b = self.b + f * ((self.b_top if self.b_top is not None else self.b) - self.b)
        a *= 1.0 - self.waist * (1.0 - (2 * f - 1) ** 2)
        win = grid.window(cx - a - 1, cx + a + 1, cy - b - 1, cy + b + 1)
        if win is None:
            return None
        rs, cs, xs, ys = win
        u = np.abs((xs - cx) / a) ** self.p
        v = np.abs((ys - cy) / b) ** self.p
        rho = (v[:, None] + u[None, :]) ** (1.0 / self.p)
        depth_xy = (1.0 - rho) * min(a, b)
        if self.tilt0 == 0.0 and self.tilt1 == 0.0:
            depth_z: float | np.ndarray = min(z - self.z0, self.z1 - z)
        else:  # per row (y): the distance in z to the inclined planes, (rows, 1)
            bottom = self.z0 + self.tilt0 * (ys - self.c0[1])
            top = self.z1 + self.tilt1 * (ys - self.c1[1])
            depth_z = np.minimum(z - bottom, top - z)[:, None]
        return rs, cs, depth_xy, depth_z

    def draw_bone(self, z: float, grid: SliceGrid, buf: BoneBuffers) -> None:
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, depth_xy, depth_z = g
        alpha = _cover(depth_xy, grid.pixel_mm) * np.clip(depth_z / grid.thickness_mm + 0.5, 0, 1)
        if not alpha.any():
            return
        blur_xy = max(grid.pixel_mm, 1.0)
        hu = _shell_hu(depth_xy, self.cortical, self.cancellous, self.shell_mm, blur_xy)
        hu_z = _shell_hu(
            np.asarray(depth_z),
            self.cortical,
            self.cancellous,
            self.endplate_mm,
            max(grid.thickness_mm, 1.0),
        )
        buf.put(rs, cs, alpha, np.maximum(hu, hu_z))

    def draw_class(
        self,
        z: float,
        grid: SliceGrid,
        cmap: np.ndarray,
        value: int,
        allow: np.ndarray | None = None,
    ) -> None:
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, depth_xy, depth_z = g
        _fill(cmap, rs, cs, (depth_xy >= 0) & (np.asarray(depth_z) >= 0), value, allow)


@dataclass
class Ellipsoid:
    """An axis-aligned ellipsoid (organs, femoral heads, skull); optionally a shell only."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]
    cortical: float = 0.0
    cancellous: float = 0.0
    shell_mm: float = 1.5
    hollow_mm: float | None = None  # bone: only a shell of this thickness (skull)
    z_from: float | None = None  # cut below this z (acetabular roof)

    @property
    def zmin(self) -> float:
        lo = self.c[2] - self.r[2]
        return lo if self.z_from is None else max(lo, self.z_from)

    @property
    def zmax(self) -> float:
        return self.c[2] + self.r[2]

    def _geometry(self, z: float, grid: SliceGrid):
        dz = (z - self.c[2]) / self.r[2]
        if abs(dz) >= 1.0 or (self.z_from is not None and z < self.z_from):
            return None
        k = np.sqrt(1.0 - dz * dz)
        a, b = self.r[0] * k, self.r[1] * k
        win = grid.window(
            self.c[0] - a - 1, self.c[0] + a + 1, self.c[1] - b - 1, self.c[1] + b + 1
        )
        if win is None:
            return None
        rs, cs, xs, ys = win
        u = np.square((xs - self.c[0]) / self.r[0])
        v = np.square((ys - self.c[1]) / self.r[1])
        rho = np.sqrt(v[:, None] + u[None, :] + dz * dz)
        depth = (1.0 - rho) * min(self.r)
        return rs, cs, depth

    def draw_bone(self, z: float, grid: SliceGrid, buf: BoneBuffers) -> None:
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, depth = g
        alpha = _cover(depth, grid.pixel_mm)
        if self.hollow_mm is not None:
            alpha = alpha * _cover(self.hollow_mm - depth, grid.pixel_mm)
        if not alpha.any():
            return
        hu = _shell_hu(depth, self.cortical, self.cancellous, self.shell_mm, max(grid.pixel_mm, 1))
        buf.put(rs, cs, alpha, hu)

    def draw_class(
        self,
        z: float,
        grid: SliceGrid,
        cmap: np.ndarray,
        value: int,
        allow: np.ndarray | None = None,
    ) -> None:
        g = self._geometry(z, grid)
        if g is None:
            return
        rs, cs, depth = g
        _fill(cmap, rs, cs, depth >= 0, value, allow)


@dataclass
class Plate:
    """A curved plate whose axial cross-section is a thick polyline (iliac wing, scapula).

    For each slice ``z`` inside [z0, z1], ``path(z)`` gives the (n, 2) polyline in mm and
    ``thickness(z, u)``/``brightness(z, u)`` (u = 0..1 along the path) its full thickness (mm)
    and a cortical HU factor; ``visible(z, u)`` masks parts of the path (the crest's arch).
    """

    z0: float
    z1: float
    path: object  # Callable[[float], np.ndarray]
    thickness: object  # Callable[[float, np.ndarray], np.ndarray]
    cortical: object  # Callable[[float, np.ndarray], np.ndarray]
    cancellous: float = 200.0
    visible: object = None  # Callable[[float, np.ndarray], np.ndarray] -> bool
    extra: dict = field(default_factory=dict)

    @property
    def zmin(self) -> float:
        return self.z0

    @property
    def zmax(self) -> float:
        return self.z1

    def draw_bone(self, z: float, grid: SliceGrid, buf: BoneBuffers) -> None:
        if not (self.z0 <= z <= self.z1):
            return
        pts = np.asarray(self.path(z), dtype=np.float64)  # type: ignore[operator]
        n = len(pts)
        u_nodes = np.linspace(0.0, 1.0, n)
        tmax = float(np.max(self.thickness(z, u_nodes)))  # type: ignore[operator]
        pad = tmax / 2 + 1
        win = grid.window(
            pts[:, 0].min() - pad,
            pts[:, 0].max() + pad,
            pts[:, 1].min() - pad,
            pts[:, 1].max() + pad,
        )
        if win is None:
            return
        rs, cs, xs, ys = win
        X = xs[None, :]
        Y = ys[:, None]
        best = np.full((len(ys), len(xs)), np.inf)
        best_u = np.zeros_like(best)
        for i in range(n - 1):
            ax, ay = pts[i]
            dx, dy = pts[i + 1] - pts[i]
            dd = dx * dx + dy * dy or 1e-9
            t = np.clip(((X - ax) * dx + (Y - ay) * dy) / dd, 0.0, 1.0)
            d = np.hypot(X - ax - t * dx, Y - ay - t * dy)
            m = d < best
            best = np.where(m, d, best)
            best_u = np.where(m, u_nodes[i] + t * (u_nodes[i + 1] - u_nodes[i]), best_u)
        half = 0.5 * self.thickness(z, best_u)  # type: ignore[operator]
        depth = half - best
        alpha = _cover(depth, grid.pixel_mm)
        if self.visible is not None:
            alpha = alpha * self.visible(z, best_u)  # type: ignore[operator]
        if not alpha.any():
            return
        cort = self.cortical(z, best_u)  # type: ignore[operator]
        blur = max(grid.pixel_mm, 1.0)
        amp = np.minimum(1.0, 1.2 / blur)
        hu = self.cancellous + (cort - self.cancellous) * np.where(
            half < 2.5, 1.0, amp * np.exp(-np.square(depth / max(1.2, 0.5 * blur)))
        )
        buf.put(rs, cs, alpha.astype(np.float32), hu.astype(np.float32))
