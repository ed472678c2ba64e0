"""Tests of the first stage of the L3 locator and of the shipped weights.

worker/locator/: windows, decision (slope -1 correlation), weights, coarse, locate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import LocatorConfig
from core.errors import AnalysisError
from tests.conftest import require_shipped
from worker.locator.decision import decide_l3
from worker.locator.locate import RAW_FLAG_THRESHOLD, locate_l3
from worker.locator.model import build_model
from worker.locator.weights import LoadedLocator, LocatorWeightsError, load_locator, save_locator
from worker.locator.windows import WindowSpec, mip_to_strip, sliding_windows
from worker.mip import FrontalMips, frontal_mip
from worker.volume.load import CTVolume

SPEC = WindowSpec()  # the shipped geometry: 3 mm, H = 110 px, a = 17 px
H, A = SPEC.height_px, SPEC.a_px


def ideal_predictions(tops: np.ndarray, l3_row: float) -> np.ndarray:
    """What a perfect network predicts: L3 row inside the window where it lies within
    +/- a of the centre; saturated at the range ends elsewhere (as a regression does)."""
    return np.clip(l3_row - tops, H / 2 - A - 2, H / 2 + A + 2).astype(np.float64)


def test_decision_on_a_perfect_slope_minus_one_sequence_is_exact() -> None:
    tops = np.arange(-105, 400, 4)
    for l3 in (0.0, 57.0, 123.0, 250.0):
        d = decide_l3(tops, ideal_predictions(tops, l3), H, A)
        assert d.row == pytest.approx(l3)
        assert d.correlation_peak == pytest.approx(1.0)
        assert d.confidence == pytest.approx(1.0)


def test_decision_on_noise_has_low_confidence() -> None:
    tops = np.arange(-105, 400, 4)
    threshold = RAW_FLAG_THRESHOLD  # the raw score's threshold (no calibration)
    conf = []
    for seed in range(20):
        noise = np.random.default_rng(seed).uniform(H / 2 - A, H / 2 + A, len(tops))
        conf.append(decide_l3(tops, noise, H, A).confidence)
    assert max(conf) < threshold and float(np.mean(conf)) < 0.3


def test_presence_weights_the_choice_between_two_lines() -> None:
    tops = np.arange(-105, 400, 4)
    pred = ideal_predictions(tops, 100.0)
    second = ideal_predictions(tops, 250.0)
    late = tops + H / 2 > 175
    pred[late] = second[late]
    presence = np.where(np.abs(tops + H / 2 - 250.0) <= A, 0.95, 0.05)
    assert decide_l3(tops, pred, H, A, presence).row == pytest.approx(250.0)


def test_sliding_windows_are_aligned_with_their_top_rows() -> None:
    strip = np.zeros((100, SPEC.width_px), np.float32)
    strip[40] = 1.0
    windows, tops = sliding_windows(strip, SPEC, stride=4)
    assert windows.shape[1:] == (H, SPEC.width_px)
    assert tops[0] == -SPEC.pad_px and np.all(np.diff(tops) == 4)
    for w, t in zip(windows, tops, strict=True):
        rows = torch.nonzero(w[:, 0]).flatten().tolist()
        assert rows == ([40 - t] if 0 <= 40 - t < H else [])
    # every row of the scan can be the centre +/- a of some window
    assert tops[0] + H / 2 <= -A and tops[-1] + H / 2 >= 99 + A - 4


def test_strip_has_fixed_width_centred_on_the_body() -> None:
    img = np.full((50, 300), -1000.0, np.float32)
    img[:, 200:260] = 40.0  # patient off-centre
    strip = mip_to_strip(img, SPEC)
    assert strip.shape == (50, SPEC.width_px)
    body = np.nonzero(strip[0] > 0)[0]
    assert abs((body.min() + body.max()) / 2 - SPEC.width_px / 2) <= 2


def _volume(n: int = 90, dz: float = 3.0, uneven: bool = False) -> CTVolume:
    z = np.arange(n, dtype=np.float64) * dz - 100.0
    if uneven:
        z[n // 2 :] += 1.0
    hu = np.full((n, 40, 64), -1000.0, np.float32)
    hu[:, 10:30, 8:56] = 40.0
    return CTVolume(hu=hu, z_mm=z, pixel_spacing_mm=(6.0, 6.0), series_instance_uid="1.2.3.4")


def _save_random_model(path: Path) -> None:
    torch.manual_seed(0)
    save_locator(path, build_model("cnn4", H, SPEC.width_px), "cnn4", SPEC, {"command": "t"})


def test_missing_or_corrupt_weights_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LocatorWeightsError, match="not found"):
        load_locator(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(LocatorWeightsError, match="unreadable"):
        load_locator(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(1)}, foreign)
    with pytest.raises(LocatorWeightsError, match="not an l3spot locator"):
        load_locator(foreign)
    cfg = LocatorConfig(weights=tmp_path / "none.pt", refine_weights=None)
    with pytest.raises(AnalysisError, match="1.2.3.4"):
        locate_l3(_volume(), cfg, device="cpu")


def test_load_locator_is_cached_per_file_and_device(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    _save_random_model(p)
    assert load_locator(p, "cpu") is load_locator(p, "cpu")


def test_locate_maps_the_decided_row_to_the_nearest_real_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "m.pt"
    _save_random_model(p)
    vol = _volume(uneven=True)
    mips = FrontalMips(vol)
    mip = mips.at(SPEC.pixel_mm)
    l3_z = float(vol.z_mm[61]) + 0.4

    def perfect(self: LoadedLocator, windows: torch.Tensor, batch_size: int = 64):  # noqa: ANN202
        tops = np.arange(windows.shape[0]) * 4 - SPEC.pad_px
        row = float(mip.z_to_row(l3_z))
        return ideal_predictions(tops, row).astype(np.float32), np.where(
            np.abs(tops + H / 2 - row) <= A, 0.9, 0.1
        ).astype(np.float32)

    monkeypatch.setattr(LoadedLocator, "predict", perfect)
    cfg = LocatorConfig(weights=p, refine_weights=None, verify_weights=None)
    res = locate_l3(vol, cfg, mips, device="cpu")
    assert mips.projections == 1 and mips.pixel_sizes == (SPEC.pixel_mm,)  # given MIP used
    assert res.in_field_of_view and res.slice_index == 61
    assert res.z_mm == pytest.approx(l3_z, abs=1.0)
    assert res.reason is None and res.confidence > 0.8  # corr 1 x agreement 1 x presence 0.9
    assert set(res.timings_s) == {"mip", "windows", "cnn", "decision"}


def test_locate_refuses_the_mips_of_another_volume(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    _save_random_model(p)
    with pytest.raises(ValueError, match="another volume"):
        locate_l3(_volume(), LocatorConfig(weights=p, refine_weights=None), FrontalMips(_volume()))


def test_locate_says_not_in_field_of_view_without_guessing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "m.pt"
    _save_random_model(p)

    def absent(self: LoadedLocator, windows: torch.Tensor, batch_size: int = 64):  # noqa: ANN202
        n = windows.shape[0]
        rng = np.random.default_rng(0)
        return rng.uniform(H / 2 - A, H / 2 + A, n).astype(np.float32), np.full(n, 0.02, np.float32)

    monkeypatch.setattr(LoadedLocator, "predict", absent)
    res = locate_l3(_volume(), LocatorConfig(weights=p, refine_weights=None), device="cpu")
    assert not res.in_field_of_view
    assert res.slice_index is None and res.z_mm is None and res.mip_row is None
    assert "not in field of view" in (res.reason or "")


def test_locate_runs_a_real_network_end_to_end(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    _save_random_model(p)
    vol = _volume()
    res = locate_l3(vol, LocatorConfig(weights=p, refine_weights=None), device="cpu")
    mip = frontal_mip(vol, pixel_mm=SPEC.pixel_mm)
    n_expected = len(sliding_windows(mip_to_strip(mip.image, SPEC), SPEC, 4)[1])
    assert len(res.predictions) == len(res.window_top_rows) == n_expected
    assert len(res.presence) == n_expected and np.all((res.presence >= 0) & (res.presence <= 1))
    assert res.slice_index is None or 0 <= res.slice_index < len(vol.z_mm)


# ------------------------------------------------------------------- the shipped weights


def _shipped() -> LocatorConfig:
    """The shipped configuration: both stages (``locator.weights`` + ``refine_weights``)."""
    cfg = LocatorConfig()
    require_shipped(cfg.weights, "first-stage locator weights")
    return cfg


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_shipped_model_finds_l3_in_a_held_out_phantom() -> None:
    cfg = _shipped()
    from worker.training.locator import phantom_volume

    for seed in (2_000_001, 2_000_002, 2_000_003):
        vol, z = phantom_volume(seed, training=True)  # small and coarse: fast
        res = locate_l3(vol, cfg, device="cpu")
        if z is None:
            assert not res.in_field_of_view
            continue
        assert res.in_field_of_view and res.z_mm is not None
        assert abs(res.z_mm - z) <= 15.0


def test_shipped_model_says_chest_ct_is_not_in_field_of_view(shared_data: Path) -> None:
    cfg = _shipped()
    from worker.training.locator import load_volume_any

    vol = load_volume_any(shared_data / "chest_ct_lidc")
    res = locate_l3(vol, cfg, device="cpu")
    assert not res.in_field_of_view and res.slice_index is None


def test_shipped_model_finds_l3_in_the_real_abdomen_within_two_slices(shared_data: Path) -> None:
    cfg = _shipped()
    from worker.training.locator import load_volume_any

    vol = load_volume_any(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz")
    res = locate_l3(vol, cfg, device="cpu")
    assert res.in_field_of_view and res.slice_index is not None
    assert abs(res.slice_index - 72) <= 2  # TotalSegmentator L3 label: z 65..79, mid 72
