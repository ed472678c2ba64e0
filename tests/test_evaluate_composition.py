"""Tests of worker.evaluate_composition and the composition CLI commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from worker.config import CompositionConfig
from worker.evaluate_composition import (
    dice,
    evaluate_phantoms,
    format_summary,
    random_synthetic_l3,
    score,
)
from worker.train_seg import TrainingSlice, train_unet


def test_dice_and_area_error_arithmetic():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:5] = True  # 50 px
    b[:4] = True  # 40 px, all inside a
    assert dice(a, b) == pytest.approx(80 / 90)
    s = score("c", "sma", a, b, 0.01)
    assert s.area_error_cm2 == pytest.approx(0.1) and s.area_error_pct == pytest.approx(25.0)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_synthetic_evaluation_reaches_muscle_targets():
    src, scores = evaluate_phantoms(3, 0, CompositionConfig(), synthetic=True)
    sma = [s for s in scores if s.compartment == "sma"]
    assert len(sma) == 3 and "synthetic" in src
    assert min(s.dice for s in sma) >= 0.95
    assert max(abs(s.area_error_pct) for s in sma) <= 5.0
    assert "sma" in format_summary("t", scores)


def test_train_seg_smoke_learns_on_synthetic_slices():
    slices = [TrainingSlice("s", *random_synthetic_l3(i)) for i in range(2)]
    cfg = CompositionConfig(unet_pixel_mm=4.0)  # coarse grid: a few-second smoke run
    model, losses = train_unet(slices, cfg, steps=12, batch=2, crop=64, lr=3e-3, levels=3, base=6)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_cli_composition_writes_png(tmp_path: Path, shared_data: Path):
    out = tmp_path / "l3.png"
    ct = shared_data / "abdomen_ct_totalseg" / "ct.nii.gz"
    res = CliRunner().invoke(app, ["composition", str(ct), "--slice", "72", "--png", str(out)])
    assert res.exit_code == 0, res.output
    assert "SMA" in res.output and "body_truncated" in res.output
    from PIL import Image

    img = Image.open(out)
    assert img.width > 512 and img.mode == "RGB"
    px = np.asarray(img)
    assert (np.abs(px.astype(int) - (220, 50, 47)).sum(-1) < 120).sum() > 1000  # SMA colour


def test_cli_evaluate_composition_prints_tables():
    res = CliRunner().invoke(
        app, ["evaluate-composition", "--phantoms", "2", "--synthetic", "--no-real"]
    )
    assert res.exit_code == 0, res.output
    assert "Dice" in res.output and "sat" in res.output
