"""Input windows of the L3 locator: HU normalisation, body-centred strip, sliding windows.

Belharbi et al. 2017, section 3.2: the network sees windows of height H cut from the frontal
MIP; training windows hold L3 within ``[-a, +a]`` of their centre. The window geometry
(:class:`WindowSpec`, pixel size included) belongs to a trained model and is stored in its
weights file (:func:`worker.locator.weights.save_locator`); nothing else sets it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

#: HU window of the network input: air/fat floor to dense cortical bone (ANATOMY.md: cortical
#: bone 700-1500 HU, cancellous 150-300, soft tissue 30-60). Linear to [0, 1]; air padding = 0.
INPUT_HU_WINDOW = (-200.0, 1600.0)

#: Columns whose MIP exceeds this HU count as "body" for centring the fixed-width strip.
BODY_HU = -300.0


@dataclass(frozen=True)
class WindowSpec:
    """Geometry and intensity of the MIP windows a locator model was trained on.

    Stored with the weights (``"spec"`` of the :func:`worker.locator.weights.save_locator`
    file): the MIP pixel size of an analysis comes from here, never from the configuration.

    Attributes
    ----------
    pixel_mm : MIP pixel edge (mm), both axes.
    height_mm : window height H along z (mm). Paper: 400 px at about 1 mm.
    width_mm : fixed window width (mm) around the body centre; narrower MIPs are padded with
        air, wider ones cropped.
    a_mm : training windows hold L3 within ``[-a, +a]`` of the window centre (paper: 50 px
        at about 1 mm).
    hu_window : (low, high) HU mapped linearly to [0, 1] (clipped).
    """

    pixel_mm: float = 3.0
    height_mm: float = 330.0
    width_mm: float = 384.0
    a_mm: float = 51.0
    hu_window: tuple[float, float] = INPUT_HU_WINDOW

    @property
    def height_px(self) -> int:
        """Window height H in MIP rows."""
        return int(round(self.height_mm / self.pixel_mm))

    @property
    def width_px(self) -> int:
        """Window width W in MIP columns."""
        return int(round(self.width_mm / self.pixel_mm))

    @property
    def a_px(self) -> float:
        """Half-range ``a`` of the training offsets, in MIP rows."""
        return self.a_mm / self.pixel_mm

    @property
    def pad_px(self) -> int:
        """Air rows added above and below the MIP so a window can centre on any row +/- a."""
        return self.height_px // 2 + int(np.ceil(self.a_px))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``"spec"`` entry of a weights file)."""
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowSpec:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "hu_window" in d:
            d["hu_window"] = tuple(float(v) for v in d["hu_window"])
        return cls(**d)


def normalise_hu(image: np.ndarray, hu_window: tuple[float, float] = INPUT_HU_WINDOW) -> np.ndarray:
    """Map HU linearly from ``hu_window`` to [0, 1] (clipped); float32, same shape."""
    lo, hi = hu_window
    return np.clip((np.asarray(image, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def body_centre_column(image_hu: np.ndarray) -> float:
    """Column (fractional) at the middle of the body in a frontal MIP ``(rows, cols)`` HU.

    The weighted median of the per-column count of body pixels (> :data:`BODY_HU`), so an
    off-centre patient is centred; falls back to the image centre for an empty image.
    """
    counts = (np.asarray(image_hu) > BODY_HU).sum(axis=0).astype(np.float64)
    if counts.sum() <= 0:
        return (image_hu.shape[1] - 1) / 2.0
    cdf = np.cumsum(counts) / counts.sum()
    return float(np.searchsorted(cdf, 0.5))


def mip_to_strip(image_hu: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Normalised, fixed-width strip of a frontal MIP, not yet padded in z.

    Parameters
    ----------
    image_hu : (rows, cols) MIP in HU at ``spec.pixel_mm`` (row 0 = most superior).
    spec : window geometry.

    Returns
    -------
    np.ndarray
        (rows, spec.width_px) float32 in [0, 1]; columns centred on the body
        (:func:`body_centre_column`), air (0) where the MIP is narrower.
    """
    rows, cols = image_hu.shape
    w = spec.width_px
    norm = normalise_hu(image_hu, spec.hu_window)
    c0 = int(round(body_centre_column(image_hu))) - w // 2
    out = np.zeros((rows, w), np.float32)
    src_lo, src_hi = max(c0, 0), min(c0 + w, cols)
    if src_hi > src_lo:
        out[:, src_lo - c0 : src_hi - c0] = norm[:, src_lo:src_hi]
    return out


def sliding_windows(
    strip: np.ndarray, spec: WindowSpec, stride: int
) -> tuple[torch.Tensor, np.ndarray]:
    """All windows of height H over a strip padded with air above and below.

    Parameters
    ----------
    strip : (rows, W) normalised strip from :func:`mip_to_strip`.
    spec : window geometry (H, padding).
    stride : step between consecutive windows, MIP rows (paper: up to 6 px at ~1 mm).

    Returns
    -------
    windows : (n, H, W) float32 tensor (a view into the padded strip).
    top_rows : (n,) int64, MIP row of each window's top edge (negative = in the padding).

    Raises
    ------
    ValueError
        ``stride`` < 1.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    pad, h = spec.pad_px, spec.height_px
    padded = np.zeros((strip.shape[0] + 2 * pad, strip.shape[1]), np.float32)
    padded[pad : pad + strip.shape[0]] = strip
    t = torch.from_numpy(padded)
    windows = t.unfold(0, h, stride).permute(0, 2, 1)  # (n, H, W)
    top_rows = np.arange(windows.shape[0], dtype=np.int64) * stride - pad
    return windows, top_rows
