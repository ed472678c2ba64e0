"""A synthetic axial slice at L3 with exact tissue labels, for the composition tests.

Geometry (1 mm pixels by default): an elliptic trunk with subcutaneous fat, a muscle ring with
a gap at the linea alba, paraspinal muscles, psoas beside a vertebra with a cortical rim,
kidneys, a liver tip against the right lateral wall, bowel loops with gas and oral contrast,
optionally arms beside or touching the trunk and a CT table below it.
"""

from __future__ import annotations

import numpy as np

from worker import labels as lab

MUSCLE_HU = 45.0
FAT_HU = -100.0


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synthetic_l3(
    px: float = 1.0,
    *,
    arms: str = "none",
    table: bool = True,
    noise_hu: float = 8.0,
    seed: int = 0,
    liver: bool = True,
    metal: bool = False,
    truncate: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(hu (y, x) float32, labels (y, x) uint8, spacing (px, px) mm).

    ``arms``: "none", "apart" (beside the trunk, not touching) or "touching".
    """
    ny, nx = int(300 / px), int(420 / px)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64) * px
    cy, cx = 140.0, 210.0
    hu = np.full((ny, nx), -1000.0)
    labels = np.zeros((ny, nx), np.uint8)
    body = _ellipse(yy, xx, cy, cx, 115, 150)
    hu[body] = FAT_HU
    labels[body] = lab.SAT
    wall_out = _ellipse(yy, xx, cy, cx, 92, 127)
    wall_in = _ellipse(yy, xx, cy, cx, 80, 115)
    ring = wall_out & ~wall_in & ~((np.abs(xx - cx) < 4) & (yy < cy))  # linea alba gap
    cavity = wall_out
    hu[cavity] = FAT_HU
    labels[cavity] = lab.VAT
    muscle = ring.copy()
    # paraspinals (posterior, either side of the spinous process), psoas beside the body
    muscle |= _ellipse(yy, xx, cy + 62, cx - 28, 20, 22) | _ellipse(
        yy, xx, cy + 62, cx + 28, 20, 22
    )
    muscle |= _ellipse(yy, xx, cy + 22, cx - 35, 17, 15) | _ellipse(
        yy, xx, cy + 22, cx + 35, 17, 15
    )
    muscle &= cavity
    hu[muscle] = MUSCLE_HU
    labels[muscle] = lab.SMA
    # IMAT: fat streaks inside the paraspinals
    imat = (
        _ellipse(yy, xx, cy + 62, cx - 30, 3, 5) | _ellipse(yy, xx, cy + 60, cx + 30, 3, 5)
    ) & muscle
    hu[imat] = FAT_HU
    labels[imat] = lab.IMAT
    # vertebra: body with cortex and osteoporotic cancellous bone, spinous process
    vb = _ellipse(yy, xx, cy + 20, cx, 16, 20)
    hu[vb] = 600.0
    hu[_ellipse(yy, xx, cy + 20, cx, 13, 17)] = 110.0  # cancellous bone in the muscle range
    spine = (np.abs(xx - cx) < 4) & (yy > cy + 36) & (yy < cy + 78)
    canal = _ellipse(yy, xx, cy + 44, cx, 7, 9)
    hu[spine] = 600.0
    hu[canal] = 15.0  # CSF
    lamina = _ellipse(yy, xx, cy + 44, cx, 11, 13) & ~canal
    hu[lamina] = 600.0
    labels[vb | spine | canal | lamina] = 0
    # kidneys (muscle-range HU, as unenhanced), separated from the psoas by perirenal fat
    for sx in (-1, 1):
        k = _ellipse(yy, xx, cy + 10, cx + sx * 80, 22, 14)
        hu[k] = 35.0
        labels[k] = 0
    # aorta / IVC in front of the vertebra
    for sx, r in ((1, 11), (-1, 10)):
        v = _ellipse(yy, xx, cy - 8, cx + sx * 14, r, r)
        hu[v] = 45.0
        labels[v] = 0
    # liver tip against the right lateral wall (patient right = low x)
    if liver:
        lv = _ellipse(yy, xx, cy - 10, cx - 90, 40, 28) & wall_in
        hu[lv] = 55.0
        labels[lv] = 0
    # bowel loops: wall, gas, oral contrast; one touches the anterior wall
    for by, bx, content in (
        (cy - 60, cx - 20, -1000.0),
        (cy - 45, cx + 45, 350.0),
        (cy - 20, cx + 75, -1000.0),
        (cy - 72, cx + 15, 300.0),
    ):
        outer = _ellipse(yy, xx, by, bx, 15, 15) & wall_in
        inner = _ellipse(yy, xx, by, bx, 11, 11)
        hu[outer] = 40.0
        hu[inner & outer] = content
        labels[outer] = 0
    if table:
        t = (yy > cy + 122) & (yy < cy + 126) & (np.abs(xx - cx) < 190)
        hu[t] = 50.0
    if arms != "none":
        gap = 8.0 if arms == "apart" else -2.0
        for sx in (-1, 1):
            ax = cx + sx * (150 + gap + 40)
            arm = _ellipse(yy, xx, cy, ax, 45, 40)
            hu[arm] = FAT_HU
            hu[_ellipse(yy, xx, cy, ax, 33, 28)] = MUSCLE_HU
            hu[_ellipse(yy, xx, cy, ax, 9, 9)] = 700.0
            labels[arm & ~body] = 0
    if metal:
        m = _ellipse(yy, xx, cy + 20, cx + 10, 4, 4)
        hu[m] = 3000.0
        labels[m] = 0
    rng = np.random.default_rng(seed)
    hu = hu + rng.normal(0, noise_hu, hu.shape)
    # truth follows the HU ranges (Mitsiopoulos) like any threshold-defined reference
    labels[(labels == lab.SMA) & ~((hu >= -29) & (hu <= 150))] = 0
    fat_lab = np.isin(labels, (lab.VAT, lab.SAT, lab.IMAT))
    labels[fat_lab & ~((hu >= -190) & (hu <= -30))] = 0
    if truncate:
        keep = xx < cx + 140
        hu = hu[:, : int(keep[0].sum())]
        labels = labels[:, : hu.shape[1]]
    return hu.astype(np.float32), labels, (px, px)
