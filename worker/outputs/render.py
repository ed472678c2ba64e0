"""The pictures a radiologist reads: L3 slice with coloured masks, frontal MIP, numbers.

:func:`render_summary` builds the RGB image stored as the Secondary Capture (most PACS
viewers show neither SEG nor SR, MONAILabel#1621); :func:`render_overview` adds the
locator's evidence (predicted offsets of the sliding windows and the correlation curve,
Belharbi et al. 2017 Fig. 6) for ``overview.png``. No patient name, ID or birth date is ever
drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core import ALGORITHM_NAME, __version__
from core.followup import MeasurementChange
from core.labels import COMPARTMENT_COLOURS, COMPARTMENT_NAMES, COMPARTMENTS
from core.qa import qa_flag
from core.result import level_verification_text
from worker.composition.measure import CompositionResult
from worker.locator.locate import L3Location
from worker.mip import Mip
from worker.outputs.reference import ImageLabel

#: Height of the picture in pixels (reading-room monitors: >= 1024).
HEIGHT = 1024
#: Soft-tissue window of the L3 slice (centre, width) in HU.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
#: Bone window of the frontal MIP (centre, width) in HU.
BONE_WINDOW = (400.0, 1800.0)
#: Opacity of the tissue colours over the CT.
MASK_ALPHA = 0.45
MIP_MAX_WIDTH = 640
TEXT_WIDTH = 700
BACKGROUND = (0, 0, 0)
TEXT = (235, 235, 235)
ACCENT = (255, 214, 0)  # the L3 line and warnings
WARN = (255, 120, 80)


def _load_font(size: int, mono: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (Debian fonts-dejavu) when installed, else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf" if mono else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return _load_font(size)


#: "²" only when the font can draw it (Pillow's built-in font cannot).
_SQ = (
    "²"
    if isinstance(_load_font(10), ImageFont.FreeTypeFont)
    and _load_font(10).getname()[0].startswith("DejaVu")
    else "2"
)
#: x offsets (px) of the columns of the measurement table in the text panel.
TABLE_COLUMNS = (0, 110, 330)


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map HU to uint8 grey levels with a linear window (centre, width in HU)."""
    lo = centre - width / 2
    return (np.clip((np.asarray(hu, np.float32) - lo) / width, 0, 1) * 255).astype(np.uint8)


def overlay_labels(hu_slice: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """(rows, cols, 3) uint8: soft-tissue window of ``hu_slice`` with coloured compartments.

    Parameters
    ----------
    hu_slice : (rows, cols) HU of the L3 slice.
    labels : (rows, cols) label map of :mod:`core.labels`, or None for no overlay.
    """
    grey = window(hu_slice, *SOFT_TISSUE_WINDOW)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if labels is not None:
        for lab, colour in COMPARTMENT_COLOURS.items():
            m = labels == lab
            rgb[m] = (1 - MASK_ALPHA) * rgb[m] + MASK_ALPHA * np.asarray(colour, np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _fit(img: Image.Image, box_w: int, box_h: int, aspect: float = 1.0) -> Image.Image:
    """Resize ``img`` into (box_w, box_h) keeping its physical aspect (row/col pixel ratio)."""
    w, h = img.size
    phys_w, phys_h = float(w), float(h) * aspect
    scale = min(box_w / phys_w, box_h / phys_h)
    size = (max(1, round(phys_w * scale)), max(1, round(phys_h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _slice_panel(
    hu_slice: np.ndarray | None,
    labels: np.ndarray | None,
    pixel_spacing_mm: tuple[float, float],
    message: str | None,
) -> Image.Image:
    panel = Image.new("RGB", (HEIGHT, HEIGHT), BACKGROUND)
    if hu_slice is not None:
        img = Image.fromarray(overlay_labels(hu_slice, labels))
        aspect = pixel_spacing_mm[0] / pixel_spacing_mm[1]
        img = _fit(img, HEIGHT, HEIGHT, aspect)
        panel.paste(img, ((HEIGHT - img.width) // 2, (HEIGHT - img.height) // 2))
    draw = ImageDraw.Draw(panel)
    if message:
        f = _font(44)
        w = draw.textlength(message, font=f)
        draw.text(((HEIGHT - w) / 2, HEIGHT / 2 - 22), message, fill=ACCENT, font=f)
    # orientation marks (radiological convention: patient right on the image left)
    f = _font(24)
    draw.text((12, HEIGHT / 2 - 12), "R", fill=TEXT, font=f)
    draw.text((HEIGHT - 30, HEIGHT / 2 - 12), "L", fill=TEXT, font=f)
    draw.text((HEIGHT / 2 - 8, 10), "A", fill=TEXT, font=f)
    return panel


def _mip_panel(mip: Mip, location: L3Location) -> tuple[Image.Image, float, int]:
    """MIP picture (bone window) with the L3 line; returns (panel, px per MIP row, top)."""
    img = Image.fromarray(window(mip.image, *BONE_WINDOW)).convert("RGB")
    img = _fit(img, MIP_MAX_WIDTH, HEIGHT)
    panel = Image.new("RGB", (img.width, HEIGHT), BACKGROUND)
    top = (HEIGHT - img.height) // 2
    panel.paste(img, (0, top))
    scale = img.height / max(mip.rows, 1)
    draw = ImageDraw.Draw(panel)
    if location.in_field_of_view and location.mip_row is not None:
        y = top + (location.mip_row + 0.5) * scale
        draw.line([(0, y), (panel.width, y)], fill=ACCENT, width=3)
        draw.text((8, y - 34), "L3", fill=ACCENT, font=_font(30))
    return panel, scale, top


def _text_lines(
    location: L3Location,
    composition: CompositionResult | None,
    qa_flags: Sequence[str],
    l3_image: ImageLabel | None,
    change: MeasurementChange | None = None,
) -> list[tuple[str, tuple[int, int, int], int, tuple[int, int, int] | None]]:
    """(text, colour, font size, swatch colour) rows of the text panel."""
    rows: list[tuple[str, tuple[int, int, int], int, tuple[int, int, int] | None]] = []
    rows.append(("L3 body composition", TEXT, 36, None))
    if not location.in_field_of_view:
        rows.append(("L3 not in field of view", ACCENT, 32, None))
        if location.reason:
            rows.append((location.reason, TEXT, 22, None))
    else:
        # the L3 image as the viewer names it (Instance Number, its own slice position)
        if l3_image is not None:
            where = f"L3: {l3_image.text()}"
        else:
            where = f"L3: slice {location.slice_index}"
        rows.append((where, TEXT, 26, None))
    rows.append((f"Localisation confidence {location.confidence:.2f}", TEXT, 26, None))
    level = level_verification_text(location.verification if location.in_field_of_view else None)
    if level:
        rows.append((level, TEXT, 22, None))
    rows.append(("", TEXT, 12, None))
    if composition is not None:
        rows.append((["", "area", "mean"], (170, 170, 170), 24, None))
        for lab, key in COMPARTMENTS.items():
            tm = composition.measures.get(key)
            if tm is None:
                continue
            hu = f"{tm.mean_hu:.1f} HU" if tm.mean_hu is not None else "n/a"
            cells = [key.upper(), f"{tm.area_cm2:.1f} cm{_SQ}", hu]
            rows.append((cells, TEXT, 28, COMPARTMENT_COLOURS[lab]))
        rows.append(("", TEXT, 12, None))
        if composition.smi_cm2_per_m2 is not None:
            rows.append((f"SMI {composition.smi_cm2_per_m2:.1f} cm{_SQ}/m{_SQ}", TEXT, 28, None))
        else:
            rows.append((f"SMI n/a: {composition.smi_reason or 'no height'}", TEXT, 22, None))
        if change is not None:  # issue 17: since the patient's previous measurement
            rows.append((change.text(f"cm{_SQ}", f"cm{_SQ}/m{_SQ}"), TEXT, 20, None))
        sarc = composition.sarcopenia
        if sarc is not None:
            if sarc.flag is None:
                text, colour = "Sarcopenia: undetermined", TEXT
            elif sarc.flag:
                text, colour = "Sarcopenia: YES", WARN
            else:
                text, colour = "Sarcopenia: no", TEXT
            rows.append((text, colour, 28, None))
            thr = sarc.threshold_cm2_per_m2
            cut = f"cut-off {sarc.cutoffs}"
            if thr is not None:
                cut += f": SMI < {thr:.1f} cm{_SQ}/m{_SQ}"
            rows.append((cut, TEXT, 22, None))
        trab = composition.trabecular
        if trab is not None and trab.mean_hu is not None:
            # issue 15: reported without a threshold (the published ones are for L1)
            rows.append((f"L3 trabecular bone {trab.mean_hu:.0f} HU", TEXT, 24, None))
        rows.append(("", TEXT, 12, None))
        for lab, name in COMPARTMENT_NAMES.items():
            rows.append((name, TEXT, 22, COMPARTMENT_COLOURS[lab]))
    if qa_flags:
        rows.append(("", TEXT, 12, None))
        rows.append(("QA:", WARN, 24, None))
        for flag in qa_flags:
            rows.append((qa_flag(flag).meaning, WARN, 22, None))
    return rows


def _text_panel(rows: list, footer: str) -> Image.Image:
    panel = Image.new("RGB", (TEXT_WIDTH, HEIGHT), (16, 16, 16))
    draw = ImageDraw.Draw(panel)
    y = 24.0
    for text, colour, size, swatch in rows:
        x = 24
        if swatch is not None:
            draw.rectangle([x, y + 4, x + size - 6, y + size - 2], fill=swatch)
            x += size + 6
        font = _font(size)
        if isinstance(text, list):  # table row: cells at fixed columns
            for cell, dx in zip(text, TABLE_COLUMNS, strict=False):
                draw.text((x + dx, y), cell, fill=colour, font=font)
            y += size * 1.3
            continue
        # wrap long rows (QA flags) at the panel width
        line = ""
        for word in text.split(" "):
            trial = (line + " " + word).strip() if line else word
            if draw.textlength(trial, font=font) > TEXT_WIDTH - x - 16 and line:
                draw.text((x, y), line, fill=colour, font=font)
                y += size * 1.25
                line = word
            else:
                line = trial
        draw.text((x, y), line, fill=colour, font=font)
        y += size * 1.3
    f = _font(20)
    for i, ln in enumerate(footer.split("\n")):
        draw.text((24, HEIGHT - 80 + 26 * i), ln, fill=(170, 170, 170), font=f)
    return panel


def render_summary(
    hu_slice: np.ndarray | None,
    pixel_spacing_mm: tuple[float, float],
    mip: Mip,
    location: L3Location,
    composition: CompositionResult | None,
    qa_flags: Sequence[str] = (),
    series_description: str = "",
    l3_image: ImageLabel | None = None,
    change: MeasurementChange | None = None,
) -> np.ndarray:
    """The Secondary Capture picture: L3 slice with masks, MIP with L3 line, the numbers.

    Parameters
    ----------
    hu_slice : (rows, cols) HU of the L3 slice, or None when L3 is not in the field of view.
    pixel_spacing_mm : (row, col) spacing of ``hu_slice`` in mm (keeps the body's aspect).
    mip : the frontal MIP the locator used (row 0 = most superior).
    location : the locator's decision.
    composition : measurements on the L3 slice, or None.
    qa_flags : quality-control flags to print.
    series_description : source series description (printed; never patient data).
    l3_image : how the viewer names the L3 image (Instance Number, slice position); printed
        instead of the 0-based slice index when given.
    change : the change since the patient's previous measurement (issue 17): one more line
        under the SMI (:meth:`core.followup.MeasurementChange.text`).

    Returns
    -------
    numpy.ndarray
        (1024, width, 3) uint8 RGB image, width about 1024 + MIP width + 700 px (1024 +
        700 px when L3 is not in the field of view: the MIP is then the large left panel).
    """
    if location.in_field_of_view:
        labels = composition.labels if composition is not None else None
        left = _slice_panel(hu_slice, labels, pixel_spacing_mm, None)
    else:  # no L3 slice to show: the whole scanned range, large, with the verdict
        left = Image.new("RGB", (HEIGHT, HEIGHT), BACKGROUND)
        img = _fit(Image.fromarray(window(mip.image, *BONE_WINDOW)).convert("RGB"), HEIGHT, HEIGHT)
        left.paste(img, ((HEIGHT - img.width) // 2, (HEIGHT - img.height) // 2))
        draw = ImageDraw.Draw(left)
        f = _font(44)
        msg = "L3 not in field of view"
        w = draw.textlength(msg, font=f)
        draw.rectangle([(HEIGHT - w) / 2 - 12, 16, (HEIGHT + w) / 2 + 12, 80], fill=(0, 0, 0))
        draw.text(((HEIGHT - w) / 2, 22), msg, fill=ACCENT, font=f)
    # the MIP panel beside the slice; without an L3 slice the MIP is already the left panel
    mid = _mip_panel(mip, location)[0] if location.in_field_of_view else Image.new("RGB", (0, 0))
    footer = (
        f"{ALGORITHM_NAME} {__version__}  automated measurement, verify before use\n"
        f"{series_description[:60]}"
    )
    right = _text_panel(
        _text_lines(location, composition, qa_flags, l3_image, change), footer.rstrip()
    )
    out = Image.new("RGB", (left.width + mid.width + right.width, HEIGHT), BACKGROUND)
    out.paste(left, (0, 0))
    out.paste(mid, (left.width, 0))
    out.paste(right, (left.width + mid.width, 0))
    return np.asarray(out)


def _curves_panel(width: int, mip: Mip, location: L3Location, height: int = 360) -> Image.Image:
    """Predicted L3 offsets per window and the correlation curve against the MIP row."""
    panel = Image.new("RGB", (width, height), (16, 16, 16))
    draw = ImageDraw.Draw(panel)
    f = _font(22)
    margin_l, margin_r, margin_t, margin_b = 90, 30, 50, 50
    pw, ph = width - margin_l - margin_r, height - margin_t - margin_b
    n_rows = max(mip.rows, 1)

    def xpix(row: float) -> float:
        return margin_l + pw * row / n_rows

    draw.rectangle([margin_l, margin_t, margin_l + pw, margin_t + ph], outline=(90, 90, 90))
    draw.text(
        (margin_l, 10),
        "Locator evidence: predicted L3 row per window (cyan), correlation (amber)",
        fill=TEXT,
        font=f,
    )
    draw.text((margin_l, height - 36), "MIP row (superior -> inferior)", fill=TEXT, font=f)
    if location.window_top_rows.size and location.predictions.size:
        l3_rows = location.window_top_rows.astype(np.float64) + location.predictions
        lo, hi = 0.0, float(n_rows)
        for r0, r in zip(location.window_top_rows, l3_rows, strict=False):
            y = margin_t + ph * (1 - (np.clip(r, lo, hi) - lo) / (hi - lo))
            x = xpix(float(r0))
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(38, 198, 218))
    if location.correlation.size and location.candidate_rows.size:
        cor = location.correlation.astype(np.float64)
        cmin, cmax = float(np.nanmin(cor)), float(np.nanmax(cor))
        span = cmax - cmin if cmax > cmin else 1.0
        pts = [
            (xpix(float(r)), margin_t + ph * (1 - (float(v) - cmin) / span))
            for r, v in zip(location.candidate_rows, cor, strict=False)
            if np.isfinite(v)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=(255, 193, 7), width=3)
        draw.text((8, margin_t), f"{cmax:.2f}", fill=(255, 193, 7), font=f)
        draw.text((8, margin_t + ph - 22), f"{cmin:.2f}", fill=(255, 193, 7), font=f)
    if location.in_field_of_view and location.mip_row is not None:
        x = xpix(location.mip_row)
        draw.line([(x, margin_t), (x, margin_t + ph)], fill=ACCENT, width=2)
        draw.text((x + 6, margin_t + 4), "L3", fill=ACCENT, font=f)
    return panel


def render_overview(summary: np.ndarray, mip: Mip, location: L3Location) -> np.ndarray:
    """``summary`` with the locator-evidence plot below it (for ``overview.png``).

    Returns
    -------
    numpy.ndarray
        (1024 + 360, width, 3) uint8 RGB image.
    """
    top = Image.fromarray(summary)
    curves = _curves_panel(top.width, mip, location)
    out = Image.new("RGB", (top.width, top.height + curves.height), BACKGROUND)
    out.paste(top, (0, 0))
    out.paste(curves, (0, top.height))
    return np.asarray(out)


def render_not_measured(reason: str, series_description: str = "") -> np.ndarray:
    """The Secondary Capture picture of a series l3spot could not measure, and why.

    Parameters
    ----------
    reason : why (PHI-free).
    series_description : source series description (printed; never patient data).

    Returns
    -------
    numpy.ndarray
        (1024, 700, 3) uint8 RGB image: the verdict "Not measured" and the reason.
    """
    rows = [
        ("L3 body composition", TEXT, 36, None),
        ("Not measured", ACCENT, 32, None),
        ("", TEXT, 12, None),
        (reason, TEXT, 24, None),
        ("", TEXT, 12, None),
        ("No numbers were produced for this series.", TEXT, 22, None),
    ]
    footer = (
        f"{ALGORITHM_NAME} {__version__}  automated measurement, verify before use\n"
        f"{series_description[:60]}"
    )
    return np.asarray(_text_panel(rows, footer.rstrip()))
