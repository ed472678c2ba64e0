"""Binary morphology and ray sampling for the classical composition method.

Disk operations give exactly the result of ``scipy.ndimage.binary_dilation`` /
``binary_erosion`` with the structuring element :func:`disk` (border value 0), computed from
one Euclidean distance transform instead of a sliding disk: a pixel is within a disk of
radius r (integer, pixels) of a mask iff its squared distance to the mask is <= r^2. For the
radii used at L3 (5-30 pixels at 0.75 mm) that is 5-50x faster; small radii keep scipy.
Every operation works on the bounding box of what it can change, with a margin.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: radius (pixels) from which a disk operation uses the distance transform
_EDT_FROM_PX = 3


def disk_radius(radius_px: float) -> int:
    """Integer radius (pixels) of the disk of nominal radius ``radius_px`` (rounded, >= 0)."""
    return max(int(round(radius_px)), 0)


def disk(radius_px: float) -> np.ndarray:
    """(2r+1, 2r+1) bool disk structuring element, r = round(radius_px) pixels."""
    r = disk_radius(radius_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + 0.25


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, mask.shape[0])
    x0, x1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, mask.shape[1])
    return slice(y0, y1), slice(x0, x1)


def dilate_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Dilation of a (y, x) bool mask by :func:`disk` (``radius_px`` in pixels).

    Equal to ``ndimage.binary_dilation(mask, structure=disk(radius_px))``.
    """
    mask = np.asarray(mask, dtype=bool)
    r = disk_radius(radius_px)
    if r < _EDT_FROM_PX:
        return ndimage.binary_dilation(mask, structure=disk(r))
    out = np.zeros_like(mask)
    box = _bbox(mask, r)
    if box is None:
        return out
    sub = mask[box]
    d = ndimage.distance_transform_edt(~sub)
    out[box] = d * d <= r * r + 0.25
    return out


def erode_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Erosion of a (y, x) bool mask by :func:`disk`, pixels outside the image count as 0.

    Equal to ``ndimage.binary_erosion(mask, structure=disk(radius_px))``.
    """
    mask = np.asarray(mask, dtype=bool)
    r = disk_radius(radius_px)
    if r < _EDT_FROM_PX:
        return ndimage.binary_erosion(mask, structure=disk(r))
    out = np.zeros_like(mask)
    box = _bbox(mask, 1)
    if box is None:
        return out
    # one pixel of background around the box: the image border (border value 0) or the
    # background beyond the mask's bounding box, at the same distance as the nearest outside
    sub = np.pad(mask[box], 1)
    d = ndimage.distance_transform_edt(sub)[1:-1, 1:-1]
    out[box] = d * d > r * r + 0.25
    return out


def open_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Opening (erosion then dilation) by :func:`disk`; equal to ``ndimage.binary_opening``."""
    return dilate_disk(erode_disk(mask, radius_px), radius_px)


def close_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Closing (dilation then erosion) by :func:`disk`; equal to ``ndimage.binary_closing``."""
    return erode_disk(dilate_disk(mask, radius_px), radius_px)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled; equal to ``ndimage.binary_fill_holes(mask)``.

    A hole is a 4-connected background component that does not reach the image edge; one
    labelling instead of scipy's propagation from the border.
    """
    mask = np.asarray(mask, dtype=bool)
    lab_img, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    edge = np.concatenate((lab_img[0], lab_img[-1], lab_img[:, 0], lab_img[:, -1]))
    outside = np.zeros(n + 1, dtype=bool)
    outside[edge] = True
    outside[0] = False
    return ~outside[lab_img]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a (y, x) bool mask (empty mask when none)."""
    lab_img, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(lab_img.ravel(), minlength=n + 1)[1:]
    return lab_img == (int(np.argmax(sizes)) + 1)


def small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Holes of ``mask`` (background components it encloses) of at most ``max_px`` pixels."""
    holes = fill_holes(mask) & ~mask
    lab_img, n = ndimage.label(holes)
    if n == 0:
        return holes
    sizes = np.bincount(lab_img.ravel(), minlength=n + 1)[1:]
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes <= max_px
    return keep[lab_img]


def circular_median(values: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a per-ray profile around the full circle (wrap-around)."""
    return ndimage.median_filter(values, size=size, mode="wrap")


def rays(
    centre: tuple[float, float], n_angles: int, r_max: float, step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample coordinates of rays from ``centre`` (row, column; pixels).

    Returns (angles (a,) rad, radii (r,) px, ys (a, r), xs (a, r)).
    """
    angles = np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False)
    radii = np.arange(0.0, r_max, step)
    ys = centre[0] + np.outer(np.sin(angles), radii)
    xs = centre[1] + np.outer(np.cos(angles), radii)
    return angles, radii, ys, xs


class RaySampler:
    """Nearest-pixel sampling of (y, x) masks along fixed rays (indices computed once)."""

    def __init__(self, shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> None:
        yi = np.clip(np.rint(ys).astype(np.intp), 0, shape[0] - 1)
        xi = np.clip(np.rint(xs).astype(np.intp), 0, shape[1] - 1)
        self.flat = yi * shape[1] + xi
        self.inside = (ys >= -0.5) & (ys <= shape[0] - 0.5) & (xs >= -0.5) & (xs <= shape[1] - 0.5)

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """(a, r) bool: ``mask`` at each ray sample, False outside the image."""
        return np.asarray(mask, dtype=bool).ravel()[self.flat] & self.inside


def first_run(flags: np.ndarray, start: int, min_len: int) -> int:
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


def polygon_mask(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(y, x) bool mask of the pixel centres inside a polygon (vertices ``ys``, ``xs``, px).

    The same even-odd test as ``skimage.draw.polygon`` (a pixel centre is inside when an
    odd number of the edges crossing its row lie strictly right of it), evaluated per row
    from the edges' crossings instead of per pixel: equal to it, about 20x faster for the
    360-vertex wall outlines. Outlines passing exactly through a pixel centre (where
    skimage has its own boundary rules) are drawn by skimage.
    """
    ys = np.ascontiguousarray(ys, dtype=np.float64)
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    if ys.size == 0:
        return mask
    minr = int(max(0.0, ys.min()))
    maxr = min(shape[0] - 1, int(np.ceil(ys.max())))
    minc = int(max(0.0, xs.min()))
    maxc = min(shape[1] - 1, int(np.ceil(xs.max())))
    if maxr < minr or maxc < minc:
        return mask
    # edge i joins vertex j = i - 1 to vertex i (skimage's order)
    yi, xi = ys, xs
    yj, xj = np.roll(ys, 1), np.roll(xs, 1)
    rows = np.arange(minr, maxr + 1, dtype=np.float64)
    y = rows[:, None]
    cross = ((yi <= y) & (y < yj)) | ((yj <= y) & (y < yi))
    r_idx, e_idx = np.nonzero(cross)
    if r_idx.size == 0:
        return mask
    yv = rows[r_idx]
    x_int = (xj[e_idx] - xi[e_idx]) * (yv - yi[e_idx]) / (yj[e_idx] - yi[e_idx]) + xi[e_idx]
    # pixel column c is left of the crossing iff c < x_int iff c < ceil(x_int)
    n_c = maxc - minc + 1
    first_out = np.clip(np.ceil(x_int) - minc, 0, n_c).astype(np.intp)
    counts = np.zeros((rows.size, n_c + 1), dtype=np.int32)
    np.add.at(counts, (r_idx, first_out), 1)
    # crossings right of column c: those whose first excluded column is > c
    right = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    inside = (right % 2) == 1
    # A pixel centre exactly on the outline (a crossing at an integer column, a vertex or a
    # horizontal edge on an integer row) is inside for skimage by its own rules: such rare
    # outlines are drawn by skimage itself.
    on_outline = (
        np.any(x_int == np.floor(x_int))
        or np.any((yi == np.floor(yi)) & (xi == np.floor(xi)))
        or np.any((yi == yj) & (yi == np.floor(yi)))
    )
    if on_outline:
        from skimage.draw import polygon

        rr, cc = polygon(ys, xs, shape=shape)
        mask[rr, cc] = True
        return mask
    mask[minr : maxr + 1, minc : maxc + 1] = inside
    return mask
