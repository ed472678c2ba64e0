"""Tests of worker.composition.unet: shapes, Dice loss, a smoke training step, ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import CompositionConfig
from worker.composition.unet import (
    UNet2D,
    dice_loss,
    load_models,
    normalise_hu,
    predict_labels,
    predict_probabilities,
    save_model,
)


def test_unet_has_four_levels_18_filters_and_keeps_shape():
    m = UNet2D()
    convs = [mod for mod in m.down[0] if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 3 and convs[0].out_channels == 18 and convs[0].kernel_size == (3, 3)
    assert m.down[-1][0].out_channels == 18 * 8
    out = m(torch.zeros(2, 1, 64, 48))
    assert out.shape == (2, 5, 64, 48)


def test_dice_loss_zero_for_perfect_and_high_for_wrong():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    good = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float() * 50
    bad = torch.nn.functional.one_hot(torch.full_like(target, 3), 5).permute(0, 3, 1, 2) * 50.0
    assert dice_loss(good, target).item() < 0.3  # empty classes count as perfect
    assert dice_loss(bad, target).item() > dice_loss(good, target).item() + 0.3


def test_normalise_clips_to_window():
    x = normalise_hu(np.array([-1000.0, -150.0, 75.0, 300.0, 2000.0]))
    assert np.allclose(x, [0, 0, 0.5, 1, 1])


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_smoke_training_step_reduces_loss():
    torch.manual_seed(0)
    m = UNet2D(levels=3, base=8)
    x = torch.rand(2, 1, 32, 32)
    y = (x[:, 0] > 0.5).long() * 1
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = dice_loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_ensemble_inference_on_source_grid(tmp_path: Path):
    torch.manual_seed(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.pt"
        save_model(UNet2D(levels=3, base=4), p, {"seed": i})
        paths.append(p)
    models = load_models(paths)
    hu = np.random.default_rng(0).normal(0, 100, (50, 70)).astype(np.float32)
    cfg = CompositionConfig(unet_weights=paths[0])
    prob = predict_probabilities(models, hu, (0.7, 0.7), cfg)
    assert prob.shape == (5, 50, 70)
    assert np.allclose(prob.sum(0), 1.0, atol=1e-4)
    lab = predict_labels(hu, (0.7, 0.7), cfg, device="cpu")
    assert lab.shape == (50, 70) and lab.dtype == np.uint8 and lab.max() < 5
    with pytest.raises(FileNotFoundError):
        load_models([tmp_path / "missing.pt"])


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "seg_unet.pt"
# Dice of the shipped weights on phantom seed 7000's L3 slice, measured at commit of the
# weights (docs/composition.md); the test allows 0.02 below (thread-count rounding).
SMA_DICE_7000, VAT_DICE_7000, SAT_DICE_7000 = 0.958, 0.761, 0.965


def test_shipped_weights_are_small_and_carry_their_training_record():
    assert SHIPPED.is_file(), "models/seg_unet.pt is shipped (docs/composition.md)"
    assert SHIPPED.stat().st_size < 5 * 2**20
    rec = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert rec["command"].startswith("l3spot train-seg") and rec["git_commit"]
    lo, hi = rec["data"]["phantom_seeds"]
    assert hi < 7000 or lo > 7019  # disjoint from the held-out evaluation set (seed 7000, n=20)
    (model,) = load_models([SHIPPED])
    assert (model.levels, model.base, model.n_classes) == (4, 18, 5)


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_shipped_weights_segment_a_held_out_phantom_l3_slice():
    from research.evaluate_composition import _phantom_slices, dice
    from worker.composition.measure import segment_slice

    torch.set_num_threads(1)
    ((_, hu, truth, sp),) = _phantom_slices(1, 7000)  # held out: training used seeds 1000-1059
    cfg = CompositionConfig(method="unet", unet_weights=SHIPPED)
    seg = segment_slice(hu, sp, cfg, device="cpu")
    measured = {"sma": SMA_DICE_7000, "vat": VAT_DICE_7000, "sat": SAT_DICE_7000}
    for v, key in ((1, "sma"), (3, "vat"), (4, "sat")):
        assert dice(seg.labels == v, truth == v) >= measured[key] - 0.02, key
