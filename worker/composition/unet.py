"""2-D U-Net for body composition at L3, in plain torch.

Architecture from the seed "Abdominal musculature segmentation and surface prediction from
CT" (Blanc-Durand et al.): 4 resolution levels, 18 initial filters doubled per level, blocks of
three 3x3 convolutions + ReLU, Dice loss, inputs clipped to [-150, 300] HU and resampled to
1 mm^2 pixels, ensemble averaging of the softmax outputs. Multi-class here: background, SMA,
IMAT, VAT, SAT (values of :mod:`core.labels`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from core.config import CompositionConfig

N_CLASSES = 5  # background + SMA, IMAT, VAT, SAT


def _block(c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet2D(nn.Module):
    """U-Net with ``levels`` resolutions and ``base`` filters at the first level.

    Input (n, 1, h, w) normalised HU; output (n, n_classes, h, w) logits. ``h`` and ``w``
    must be divisible by 2^(levels-1) (see :func:`pad_to_multiple`).
    """

    def __init__(self, levels: int = 4, base: int = 18, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.levels, self.base, self.n_classes = levels, base, n_classes
        chans = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        c_prev = 1
        for c in chans:
            self.down.append(_block(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            self.dec.append(_block(2 * c, c))
            c_prev = c
        self.head = nn.Conv2d(c_prev, n_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean Dice over the foreground classes.

    logits (n, c, h, w); target (n, h, w) int64 class indices.
    """
    prob = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean()


def normalise_hu(hu: np.ndarray, window: tuple[float, float] = (-150.0, 300.0)) -> np.ndarray:
    """Clip to ``window`` (HU) and scale to [0, 1] (float32)."""
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resample_slice(
    img: np.ndarray, spacing_mm: tuple[float, float], pixel_mm: float, order: int
) -> np.ndarray:
    """Resample a (y, x) slice from ``spacing_mm`` (dy, dx) to square ``pixel_mm`` pixels."""
    zoom = (spacing_mm[0] / pixel_mm, spacing_mm[1] / pixel_mm)
    return ndimage.zoom(img, zoom, order=order, mode="nearest", grid_mode=True)


def pad_to_multiple(img: np.ndarray, multiple: int, value: float) -> tuple[np.ndarray, tuple]:
    """Pad a (y, x) array at the end so both sides are multiples; returns (padded, slices)."""
    h, w = img.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(img, ((0, ph), (0, pw)), constant_values=value), (slice(0, h), slice(0, w))


def save_model(model: UNet2D, path: Path, record: dict | None = None) -> None:
    """Save weights and the architecture (``torch.save`` of a dict)."""
    torch.save(
        {
            "levels": model.levels,
            "base": model.base,
            "n_classes": model.n_classes,
            "state_dict": model.state_dict(),
            "record": record or {},
        },
        path,
    )


def load_models(paths: Sequence[Path], device: str = "cpu") -> list[UNet2D]:
    """Load one or more saved U-Nets (an ensemble).

    Raises
    ------
    FileNotFoundError
        A weights file is missing.
    """
    models = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"U-Net weights not found: {p}")
        ck = torch.load(p, map_location=device, weights_only=True)
        m = UNet2D(ck["levels"], ck["base"], ck["n_classes"])
        m.load_state_dict(ck["state_dict"])
        models.append(m.to(device).eval())
    return models


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict_probabilities(
    models: Sequence[UNet2D],
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
    device: str = "cpu",
) -> np.ndarray:
    """Ensemble-averaged class probabilities on the source grid.

    Parameters
    ----------
    models : one or more U-Nets; their softmax outputs are averaged (seed: ensemble).
    hu : (y, x) HU slice; spacing_mm : (dy, dx) mm.

    Returns
    -------
    (n_classes, y, x) float32 probabilities on the source pixel grid.
    """
    img = resample_slice(np.asarray(hu, np.float32), spacing_mm, config.unet_pixel_mm, order=1)
    x = normalise_hu(img, config.unet_hu_window)
    levels = models[0].levels
    xp, crop = pad_to_multiple(x, 2 ** (levels - 1), 0.0)
    t = torch.from_numpy(xp)[None, None].to(device)
    with torch.no_grad():
        prob = sum(torch.softmax(m(t), dim=1) for m in models) / len(models)
    p = prob[0].cpu().numpy()[:, crop[0], crop[1]]
    out = np.empty((p.shape[0], *hu.shape), np.float32)
    for c in range(p.shape[0]):
        zoom = (hu.shape[0] / p.shape[1], hu.shape[1] / p.shape[2])
        out[c] = ndimage.zoom(p[c], zoom, order=1, mode="nearest", grid_mode=True)
    return out


def predict_labels(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    config: CompositionConfig,
    *,
    device: str = "auto",
) -> np.ndarray:
    """(y, x) uint8 label map from the U-Net ensemble in ``config.unet_weights``.

    ``config.unet_weights`` may name one file, or a JSON list of files beside it
    (``<name>.ensemble.json``) for ensemble averaging.

    Raises
    ------
    FileNotFoundError
        Weights missing.
    """
    dev = _device(device)
    path = Path(config.unet_weights)
    ens = path.with_suffix(".ensemble.json")
    paths = [path.parent / p for p in json.loads(ens.read_text())] if ens.is_file() else [path]
    models = load_models(paths, dev)
    prob = predict_probabilities(models, hu, spacing_mm, config, dev)
    return np.argmax(prob, axis=0).astype(np.uint8)
