"""Tests of the locator's second, finer stage (worker/locator/fine.py) and its training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.config import LocatorConfig
from core.errors import AnalysisError
from tests.conftest import require_shipped
from worker.locator.decision import Decision, decide_l3
from worker.locator.fine import FINE_STAGE, choose_run, refine_in_mip, refine_windows
from worker.locator.locate import locate_l3
from worker.locator.model import build_model
from worker.locator.weights import LoadedLocator, LocatorWeightsError, save_locator
from worker.locator.windows import WindowSpec
from worker.mip import Mip
from worker.training.locator import MipCase, TrainSettings, split_by_group, train_locator
from worker.volume.load import CTVolume

FINE = WindowSpec(pixel_mm=1.0, height_mm=80.0, width_mm=96.0, a_mm=15.0)
MODELS = Path(__file__).resolve().parents[2] / "models"


class BrightestRow(nn.Module):
    """An exact 'network' for marker MIPs: the L3 offset = the row of the brightest pixel."""

    def __init__(self, height: int, a: float) -> None:
        super().__init__()
        self.h, self.a = height, a
        self.presence = None
        self.dummy = nn.Conv2d(1, 1, 1)  # so that prepare_input finds the input channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        row = x[:, 0].amax(dim=2).argmax(dim=1).float()
        return (row - self.h / 2) / self.a, None


def marker_mip(l3_row: int, rows: int = 300, pixel_mm: float = 1.0) -> Mip:
    """Body + spine blocks, and one bright bar at ``l3_row`` (the level to find)."""
    img = np.full((rows, 120), -1000.0, np.float32)
    img[:, 10:110] = 40.0
    for r in range(5, rows, 36):
        img[r : r + 26, 50:70] = 300.0
    img[l3_row - 1 : l3_row + 2, 30:90] = 1400.0
    return Mip(image=img, pixel_mm=pixel_mm, z_top_mm=500.0, slice_z_mm=np.zeros(0))


def oracle(stage: str = FINE_STAGE) -> LoadedLocator:
    model = BrightestRow(FINE.height_px, FINE.a_px)
    return LoadedLocator(model, FINE, "oracle", torch.device("cpu"), Path("x"), {"stage": stage})


def test_refine_windows_cover_the_start_plus_minus_two_a_at_the_stride() -> None:
    strip = np.random.default_rng(0).random((200, FINE.width_px)).astype(np.float32)
    win, tops = refine_windows(strip, 20.4, FINE.height_px, FINE.a_px, 3)
    centres = tops + FINE.height_px // 2
    assert win.shape == (len(tops), FINE.height_px, FINE.width_px)
    assert np.all(np.diff(tops) == 3)
    assert centres.min() <= 20 - 2 * FINE.a_px and centres.max() >= 20 + 2 * FINE.a_px
    # window content is the strip (air above it: the first window starts far above row 0)
    i = int(np.flatnonzero(tops >= 0)[0])
    assert torch.equal(win[i], torch.from_numpy(strip[tops[i] : tops[i] + FINE.height_px]))
    assert float(win[0, 0].abs().sum()) == 0.0


@pytest.mark.parametrize("start_error_mm", [-13.0, -6.0, 0.0, 7.0, 14.0])
def test_refinement_moves_a_shifted_first_answer_onto_l3(start_error_mm: float) -> None:
    mip = marker_mip(l3_row=150)
    true_z = float(mip.row_to_z(150))
    ref = refine_in_mip(mip, true_z + start_error_mm, oracle(), stride_px=2)
    assert ref.applied and ref.reason is None
    assert ref.z_mm == pytest.approx(true_z, abs=1.0)
    assert ref.shift_mm == pytest.approx(-start_error_mm, abs=1.0)
    assert ref.correlation > 0.95


def test_refinement_declines_when_the_fine_windows_disagree() -> None:
    class Noise(BrightestRow):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            g = torch.Generator().manual_seed(int(x.shape[0]))
            return torch.rand(x.shape[0], generator=g) * 2 - 1, None

    loc = oracle()
    loc.model = Noise(FINE.height_px, FINE.a_px)
    mip = marker_mip(l3_row=150)
    ref = refine_in_mip(mip, 310.0, loc, stride_px=2, min_correlation=0.9)
    assert not ref.applied and ref.z_mm == 310.0 and "do not agree" in (ref.reason or "")


def _run(row: float, selection: float) -> Decision:
    return Decision(row, 0.9, 0.9, 0.9, selection, np.zeros(0), np.zeros(0), (0, 1),
                    selection_score=selection)  # fmt: skip


def test_choose_run_prefers_the_candidate_the_fine_stage_confirms() -> None:
    img = np.full((400, 120), -1000.0, np.float32)
    img[:, 10:110] = 40.0
    img[149:152, 30:90] = 1400.0  # the only "vertebral body" the oracle recognises
    mip = Mip(image=img, pixel_mm=1.0, z_top_mm=500.0, slice_z_mm=np.zeros(0))
    near_l3, elsewhere = _run(158.0, 0.3), _run(320.0, 0.5)  # first stage prefers elsewhere
    chosen, ref = choose_run([elsewhere, near_l3], mip, mip, oracle(), stride_px=2)
    assert chosen is near_l3 and ref.applied
    assert ref.z_mm == pytest.approx(float(mip.row_to_z(150)), abs=1.0)
    only, ref1 = choose_run([elsewhere], mip, mip, oracle(), stride_px=2)
    assert only is elsewhere and not ref1.applied and ref1.z_mm == float(mip.row_to_z(320))
    with pytest.raises(ValueError):
        choose_run([], mip, mip, oracle())


def test_decision_lists_alternatives_at_other_places_best_first() -> None:
    h, a = 110, 17.0
    tops = np.arange(-105, 600, 4).astype(np.float64)

    def line(l3: float) -> np.ndarray:
        return np.clip(l3 - tops, h / 2 - a - 2, h / 2 + a + 2)

    pred = line(100.0)
    far = np.abs(tops + h / 2 - 400.0) <= a + 8  # a second, weaker line far below
    pred[far] = line(400.0)[far]
    presence = np.where(far, 0.8, 0.95)
    d = decide_l3(tops, pred, h, a, presence, n_alternatives=2)
    assert d.row == pytest.approx(100.0)
    assert len(d.alternatives) >= 1 and d.alternatives[0].row == pytest.approx(400.0, abs=1.0)
    assert all(abs(x.row - d.row) > 2 * a for x in d.alternatives)
    assert d.selection_score >= d.alternatives[0].selection_score
    assert decide_l3(tops, pred, h, a, presence).alternatives == []


def test_a_first_stage_model_is_refused_as_refinement_stage(tmp_path: Path) -> None:
    mip = marker_mip(l3_row=150)
    with pytest.raises(LocatorWeightsError, match="not a refinement-stage"):
        refine_in_mip(mip, 350.0, oracle(stage="coarse"))
    # through the pipeline: a clear analysis error carrying the Series UID
    coarse = WindowSpec()
    p = tmp_path / "coarse.pt"
    save_locator(p, build_model("cnn4", coarse.height_px, coarse.width_px), "cnn4", coarse, {})
    hu = np.full((60, 30, 64), -1000.0, np.float32)
    hu[:, 5:25, 8:56] = 40.0
    vol = CTVolume(hu=hu, z_mm=np.arange(60) * 3.0, pixel_spacing_mm=(6.0, 6.0),
                   series_instance_uid="1.2.3.9")  # fmt: skip
    cfg = LocatorConfig(weights=p, refine_weights=p)
    with pytest.raises(AnalysisError, match="1.2.3.9"):
        locate_l3(vol, cfg, device="cpu")


def _marker_case(l3_row: float, i: int) -> MipCase:
    mip = marker_mip(int(round(l3_row)), rows=220)
    return MipCase(f"c{i}", f"p{i}", mip.image, 1.0, float(int(round(l3_row))), 1.0)


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_fine_stage_training_smoke_run_learns_and_saves_a_refiner(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(1)
    cases = [_marker_case(rng.uniform(60, 160), i) for i in range(10)]
    tr, va = split_by_group(cases, 0.3, seed=0)
    settings = TrainSettings(
        epochs=2, steps_per_epoch=15, batch_size=16, lr=3e-3, val_windows=64, seed=0,
        spec=FINE, stage="fine", positive_fraction=0.2,
    )  # fmt: skip
    out = tmp_path / "fine.pt"
    _, logs = train_locator(tr, va, settings, out, {"command": "test"}, max_val_scans=3,
                            checkpoint=tmp_path / "c.ckpt")  # fmt: skip
    from worker.locator.weights import load_locator

    loc = load_locator(out, "cpu")
    assert loc.record["stage"] == FINE_STAGE and not loc.has_presence
    # whole-refinement validation figure, in mm, and it improves on the starting errors
    # (the validation starts lie at 0, +/-0.4a and +/-0.8a: mean |start error| = 0.48a)
    assert all(log.val_scan_mae_mm is not None for log in logs)
    assert min(log.val_scan_mae_mm for log in logs) < 0.48 * FINE.a_mm
    assert np.isnan(logs[-1].val_presence_acc)


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_shipped_refinement_stage_sharpens_held_out_phantoms() -> None:
    """With the shipped config (both stages), held-out phantoms land within 5 mm."""
    cfg = LocatorConfig()
    require_shipped(cfg.refine_weights, "refinement-stage locator weights")
    from worker.training.locator import phantom_volume

    for seed in (2_000_001, 2_000_002, 2_000_003):
        vol, z = phantom_volume(seed, training=True)
        res = locate_l3(vol, cfg, device="cpu")
        if z is None:
            assert not res.in_field_of_view and res.refinement is None
            continue
        assert res.refinement is not None and res.z_mm is not None
        assert abs(res.z_mm - z) <= 5.0


@pytest.mark.slow
def test_train_command_stage_fine_writes_a_refiner_with_its_record(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from l3spot import app

    out = tmp_path / "fine.pt"
    args = ["train", "--stage", "fine", "--out", str(out), "--phantoms", "3", "--epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "4", "--cache-dir", str(tmp_path / "c"),
            "--threads", "1"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["stage"] == FINE_STAGE and rec["positive_fraction"] == 1.0
    assert rec["window"]["pixel_mm"] == 1.0 and rec["window"]["a_mm"] == 18.0
    from worker.locator.weights import load_locator

    loc = load_locator(out, "cpu")
    assert loc.record["stage"] == FINE_STAGE and not loc.has_presence
