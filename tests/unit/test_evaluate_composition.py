"""Tests of research.evaluate_composition and the composition CLI commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core.config import CompositionConfig
from l3spot import app
from research.evaluate_composition import (
    dice,
    evaluate_phantoms,
    format_summary,
    random_synthetic_l3,
    score,
)
from worker.training.segmentation import TrainingSlice, train_unet


def test_dice_and_area_error_arithmetic():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:5] = True  # 50 px
    b[:4] = True  # 40 px, all inside a
    assert dice(a, b) == pytest.approx(80 / 90)
    s = score("c", "sma", a, b, 0.01)
    assert s.area_error_cm2 == pytest.approx(0.1) and s.area_error_pct == pytest.approx(25.0)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_evaluate_composition_prints_tables():
    res = CliRunner().invoke(
        app, ["evaluate-composition", "--phantoms", "2", "--synthetic", "--no-real"]
    )
    assert res.exit_code == 0, res.output
    assert "Dice" in res.output and "sat" in res.output


def test_hu_range_ceiling_counts_the_reference_rim_by_hu_alone():
    from research.evaluate_composition import CT_SM_FIRST_SLICE, hu_range_ceiling
    from worker.volume.load import CTVolume

    hu = np.full((CT_SM_FIRST_SLICE + 1, 20, 20), -100.0, np.float32)  # fat
    hu[-1, 5:15, 5:15] = 40.0  # muscle, with a muscle-HU partial-volume rim on its left
    hu[-1, 5:15, 4] = 0.0
    vol = CTVolume(hu=hu, z_mm=np.arange(hu.shape[0]) * 3.0, pixel_spacing_mm=(3.0, 3.0))
    sm = np.zeros((1, 20, 20), bool)
    sm[0, 5:15, 5:15] = True
    fat = ~sm
    fat[0, 5:15, 4] = False  # the rim belongs to no reference mask
    refs = {"skeletal_muscle": sm, "subcutaneous_fat": np.zeros_like(sm), "torso_fat": fat}
    scores = {s.compartment: s for s in hu_range_ceiling(vol, refs, CompositionConfig())}
    # the unassigned rim pixels are muscle by HU and within one pixel of the reference
    assert scores["sma"].area_pred_cm2 == pytest.approx(110 * 0.09)
    assert scores["sma"].dice == pytest.approx(200 / 210)
    # fat: the oracle never takes pixels of another reference mask (the muscle square)
    assert scores["vat+imat"].area_pred_cm2 == pytest.approx((400 - 100 - 10) * 0.09)


def test_hu_range_ceiling_on_the_real_reference_is_below_the_targets(shared_data: Path):
    """The definitional gap of round 8: even the oracle misses Dice 0.95 / 5 % at 3 mm."""
    from research.evaluate_composition import hu_range_ceiling, nifti_array, nifti_volume

    base = shared_data / "abdomen_ct_totalseg"
    vol = nifti_volume(base / "ct.nii.gz")
    refs = {
        n: nifti_array(base / "tissue_types" / f"{n}.nii.gz") > 0
        for n in ("skeletal_muscle", "subcutaneous_fat", "torso_fat")
    }
    scores = hu_range_ceiling(vol, refs, CompositionConfig())
    sma = [s for s in scores if s.compartment == "sma"]
    assert len(sma) == 30
    assert 0.8 < np.mean([s.dice for s in sma]) < 0.95
    assert np.mean([s.area_error_pct for s in sma]) > 5.0  # the rim adds area


@pytest.mark.slow
def test_real_evaluation_scores_every_reference_and_its_oracles(shared_data: Path):
    from research.evaluate_composition import evaluate_real

    out = evaluate_real(shared_data, CompositionConfig(), device="cpu")
    assert {len(out[k]) for k in ("tissue_types_raw", "tissue_types_hu")} == {90}
    assert len(out["tissue_types_ceiling"]) == 90
    ours, oracle = out["l3_psoas_paraspinal"], out["l3_psoas_paraspinal_oracle"]
    assert len(ours) == len(oracle) == 15  # the vertebrae_L3 extent, z 65..79
    for a, b in zip(ours, oracle, strict=True):
        # the oracle takes every muscle-HU pixel of the scored region, our SMA a subset of it
        assert a.case == b.case and a.area_ref_cm2 == b.area_ref_cm2
        assert b.area_pred_cm2 >= a.area_pred_cm2 > 0
