"""The L3 locator's diagnostic picture: the MIP, the windows' votes and the correlation.

Written by ``l3spot locate --png`` (a product command, so it lives in the worker and not in
:mod:`research`); Belharbi et al. 2017, Fig. 6, shows the same correlation curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from worker.locator.locate import L3Location
from worker.locator.windows import normalise_hu
from worker.mip import Mip


def render_locator_png(
    mip: Mip, loc: L3Location, out: Path, truth_row: float | None = None, scale: int | None = None
) -> Path:
    """Draw the MIP with the L3 line and, beside it, the prediction sequence and correlation.

    Parameters
    ----------
    mip : the frontal MIP the locator used (rows = z, head up).
    loc : the locator's result (``window_top_rows``, ``predictions``, ``correlation``...).
    out : PNG path.
    truth_row : reference L3 row, drawn dashed green when given.
    scale : pixels per MIP pixel in the picture (default: about 500 px tall, 1 to 4).

    Notes
    -----
    Left: MIP in a bone window, red line = decided L3 (none if not in FOV). Middle: per
    window, the vote ``top + predicted offset`` plotted at the window's centre row (blue),
    the ideal slope -1 line through the decision (grey), presence probability (orange).
    Right: correlation with the ideal line per candidate row (the paper's Fig. 6).
    """
    rows, cols = mip.image.shape
    scale = scale or max(1, min(4, 500 // max(rows, 1)))
    g = (normalise_hu(mip.image, (-300.0, 1500.0)) * 255).astype(np.uint8)
    left = Image.fromarray(g).resize((cols * scale, rows * scale), Image.Resampling.BILINEAR)
    panel_w = 220
    h = rows * scale
    canvas = Image.new("RGB", (left.width + 2 * panel_w + 20, h + 40), (20, 20, 20))
    canvas.paste(left.convert("RGB"), (0, 40))
    d = ImageDraw.Draw(canvas)
    title = (
        f"L3 slice {loc.slice_index}  z={loc.z_mm:.1f} mm  conf={loc.confidence:.2f}"
        if loc.in_field_of_view and loc.z_mm is not None
        else f"{loc.reason or 'not found'}  conf={loc.confidence:.2f}"
    )
    d.text((4, 4), title, fill=(255, 255, 255))
    d.text((4, 20), "MIP | votes (blue), presence (orange) | correlation", fill=(180, 180, 180))

    def y(row: float) -> float:
        return 40 + (row + 0.5) * scale

    if truth_row is not None:
        for x0 in range(0, left.width, 12):
            d.line([(x0, y(truth_row)), (x0 + 6, y(truth_row))], fill=(0, 220, 0), width=2)
    if loc.mip_row is not None:
        d.line([(0, y(loc.mip_row)), (canvas.width, y(loc.mip_row))], fill=(255, 40, 40), width=1)
    x1 = left.width + 10
    d.rectangle([x1, 40, x1 + panel_w - 10, 40 + h], outline=(90, 90, 90))
    hgt = loc.window_height_px or 1
    if len(loc.predictions):
        centres = loc.window_top_rows + hgt / 2.0
        # x axis of the middle panel: the predicted row inside the window, 0..H
        for i, (c, p) in enumerate(zip(centres, loc.predictions, strict=True)):
            if not 0 <= c < rows:  # window centred in the air padding: off the picture
                continue
            xx = x1 + float(np.clip(p / hgt, 0, 1)) * (panel_w - 10)
            d.ellipse([xx - 1.5, y(c) - 1.5, xx + 1.5, y(c) + 1.5], fill=(80, 160, 255))
            if len(loc.presence) == len(loc.predictions):
                px = x1 + float(loc.presence[i]) * (panel_w - 10)
                d.rectangle([px - 1, y(c) - 1, px + 1, y(c) + 1], fill=(255, 160, 0))
        if loc.mip_row is not None:
            # ideal line: prediction = L3 row - top = L3 row - (centre - H/2)
            c0, c1 = max(float(centres.min()), 0.0), min(float(centres.max()), rows - 1.0)
            pts = []
            for c in (c0, c1):
                p = loc.mip_row - (c - hgt / 2.0)
                pts.append((x1 + float(np.clip(p / hgt, 0, 1)) * (panel_w - 10), y(c)))
            d.line(pts, fill=(160, 160, 160), width=1)
    x2 = x1 + panel_w
    d.rectangle([x2, 40, x2 + panel_w - 10, 40 + h], outline=(90, 90, 90))
    if len(loc.correlation):
        pts = [
            (x2 + (float(c) + 1) / 2 * (panel_w - 10), y(r))
            for r, c in zip(loc.candidate_rows, loc.correlation, strict=True)
            if 0 <= r < rows
        ]
        d.line(pts, fill=(255, 255, 255), width=1)
        d.line(
            [(x2 + (panel_w - 10) / 2, 40), (x2 + (panel_w - 10) / 2, 40 + h)], fill=(90, 90, 90)
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
