"""Training of the body-composition U-Net (:mod:`worker.seg_unet`).

Training slices come from phantoms (``worker.phantom``, exact masks; synthetic L3 slices of
:mod:`worker.evaluate_composition` when the phantom module is absent) and from a site's own
masks: NIfTI label maps (values of :mod:`worker.labels`) beside their CT. Every slice is
resampled to ``pixel_mm`` (1 mm^2 in the seed), clipped to the HU window and scaled to [0, 1];
the loss is the soft Dice loss (seed "Abdominal musculature segmentation and surface
prediction from CT").
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.config import CompositionConfig
from worker.logs import log_event
from worker.seg_unet import UNet2D, dice_loss, normalise_hu, resample_slice, save_model

logger = logging.getLogger(__name__)


@dataclass
class TrainingSlice:
    """One (y, x) HU slice and its label map (source grid) with spacing (dy, dx) mm."""

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float]


def phantom_slices(n: int, seed: int, neighbours: int = 0) -> list[TrainingSlice]:
    """L3 slices (and ``neighbours`` slices either side) of ``n`` phantoms from ``seed``."""
    from worker.phantom import PhantomSpec, generate_phantom

    out = []
    for i in range(n):
        ph = generate_phantom(seed + i, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
        k0 = int(ph.truth.l3_mid_slice_index)
        sp = tuple(float(v) for v in ph.volume.pixel_spacing_mm)
        for k in range(k0 - neighbours, k0 + neighbours + 1):
            if 0 <= k < ph.volume.hu.shape[0]:
                # copies: a view would keep the whole phantom volume alive
                hu, lab_k = np.array(ph.volume.hu[k]), np.array(ph.labels[k])
                out.append(TrainingSlice(f"phantom{seed + i}_z{k}", hu, lab_k, sp))
    return out


def site_nifti_slices(csv_path: Path) -> list[TrainingSlice]:
    """Slices from a site CSV with columns ``ct,labels[,slice]`` (NIfTI paths, RAS).

    ``labels`` holds values of :mod:`worker.labels` on the CT grid; without ``slice`` every
    slice with any label is used. Relative paths are relative to the CSV.
    """
    from worker.evaluate_composition import nifti_array, nifti_volume

    out = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            ct = (csv_path.parent / row["ct"]).resolve()
            vol = nifti_volume(ct)
            lab_path = (csv_path.parent / row["labels"]).resolve()
            lab_ = np.rint(nifti_array(lab_path)).astype(np.uint8)
            if lab_.shape != vol.hu.shape:
                raise ValueError(f"{row['labels']}: shape {lab_.shape} != CT {vol.hu.shape}")
            ks = [int(row["slice"])] if row.get("slice") else np.flatnonzero(lab_.any((1, 2)))
            for k in ks:
                out.append(
                    TrainingSlice(f"{ct.name}_z{k}", vol.hu[k], lab_[k], vol.pixel_spacing_mm)
                )
    return out


def _prepare(s: TrainingSlice, config: CompositionConfig) -> tuple[np.ndarray, np.ndarray]:
    img = resample_slice(s.hu.astype(np.float32), s.spacing_mm, config.unet_pixel_mm, order=1)
    lab_ = resample_slice(s.labels.astype(np.uint8), s.spacing_mm, config.unet_pixel_mm, order=0)
    return normalise_hu(img, config.unet_hu_window), lab_.astype(np.int64)


def _batches(
    data: list[tuple[np.ndarray, np.ndarray]], batch: int, crop: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        xs, ys = [], []
        for i in rng.integers(0, len(data), batch):
            x, y = data[int(i)]
            # pad then random crop of crop x crop pixels (augmentation: position, flip)
            ph, pw = max(crop - x.shape[0], 0), max(crop - x.shape[1], 0)
            x = np.pad(x, ((0, ph), (0, pw)))
            y = np.pad(y, ((0, ph), (0, pw)))
            oy = int(rng.integers(0, x.shape[0] - crop + 1))
            ox = int(rng.integers(0, x.shape[1] - crop + 1))
            x, y = x[oy : oy + crop, ox : ox + crop], y[oy : oy + crop, ox : ox + crop]
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        yield torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


def train_unet(
    slices: list[TrainingSlice],
    config: CompositionConfig,
    *,
    steps: int,
    batch: int = 4,
    crop: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    levels: int = 4,
    base: int = 18,
    device: str = "cpu",
    max_seconds: float | None = None,
) -> tuple[UNet2D, list[float]]:
    """Train one U-Net with Adam and the Dice loss.

    Parameters
    ----------
    slices : training slices (any pixel spacing; resampled to ``config.unet_pixel_mm``).
    steps : optimiser steps; batch : slices per step; crop : square crop (pixels at 1 mm),
        a multiple of 2^(levels-1).
    max_seconds : wall-time budget; training stops after the step that exceeds it (the
        number of steps done is ``len(losses)``). None = no limit.

    Returns
    -------
    (model in eval mode, loss per step).
    """
    if not slices:
        raise ValueError("no training slices")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [_prepare(s, config) for s in slices]
    model = UNet2D(levels, base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step, (x, y) in zip(range(steps), _batches(data, batch, crop, rng), strict=False):
        opt.zero_grad()
        loss = dice_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        elapsed = time.perf_counter() - t0
        if step % 20 == 0:
            log_event(
                logger,
                "seg_train_step",
                step=step,
                loss=round(losses[-1], 4),
                seconds=round(elapsed, 1),
            )
        if max_seconds is not None and elapsed > max_seconds:
            break
    return model.eval(), losses


def save_trained(model: UNet2D, path: Path, record: dict) -> None:
    """Write ``path`` (weights) and ``path.with_suffix('.json')`` (the training record)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, record)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
