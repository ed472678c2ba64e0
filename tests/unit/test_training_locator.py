"""Tests of locator training (worker/train.py): window sampling, splits, CSV, a smoke run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.locator.weights import load_locator
from worker.locator.windows import WindowSpec, mip_to_strip
from worker.training.locator import (
    FovCrop,
    MipCase,
    TrainSettings,
    countable_in_z,
    countable_l3,
    csv_cases,
    draw_fov_crop,
    extract_window,
    init_from_locator,
    landmark_z_mm,
    load_case,
    read_case_csv,
    sample_windows,
    save_case,
    split_by_group,
    train_locator,
    validate_windows,
)

SMALL = WindowSpec(pixel_mm=2.0, height_mm=96.0, width_mm=192.0, a_mm=20.0)


def marker_case(
    l3_row: float | None, rows: int = 150, name: str = "c", group: str = "g"
) -> MipCase:
    """MIP (rows x 110, HU): a body, a 'spine' of blocks every 18 rows, and at L3 a wide
    bright bar (the transverse processes) that identifies the level."""
    img = np.full((rows, 110), -1000.0, np.float32)
    img[:, 15:95] = 40.0
    for r in range(3, rows, 18):
        img[r : r + 12, 48:62] = 400.0
    if l3_row is not None:
        r0 = int(round(l3_row))
        img[max(r0 - 1, 0) : r0 + 2, 25:85] = 1200.0
    return MipCase(name, group, img, 2.0, l3_row, 3.0)


def test_extract_window_takes_rows_from_top_and_pads_with_air() -> None:
    strip = np.arange(10, dtype=np.float32)[:, None].repeat(4, axis=1) / 10
    w = extract_window(strip, 3.0, 4)
    assert np.allclose(w[:, 0], [0.3, 0.4, 0.5, 0.6])
    w = extract_window(strip, -2.0, 4)
    assert np.allclose(w[:, 0], [0.0, 0.0, 0.0, 0.1])
    w = extract_window(strip, 2.0, 3, scale=2.0)
    assert np.allclose(w[:, 0], [0.2, 0.4, 0.6])


def test_positive_windows_hold_l3_within_a_of_centre_at_the_target_offset() -> None:
    cases = [marker_case(70.0, name=f"c{i}", group=f"g{i}") for i in range(3)]
    rng = np.random.default_rng(1)
    s = sample_windows(cases, SMALL, 64, rng, positive_fraction=1.0, augment=False)
    h, a = SMALL.height_px, SMALL.a_px
    assert s.x.shape == (64, h, SMALL.width_px)
    assert torch.all(s.present == 1)
    assert torch.all(s.offset.abs() <= 1.0)
    for i in range(64):
        profile = s.x[i].sum(dim=1).numpy()
        found = float(np.argmax(profile))  # the L3 bar is the brightest row
        expected = h / 2 + float(s.offset[i]) * a
        assert abs(found - expected) <= 1.0


def test_negative_windows_have_no_l3_near_the_centre_and_no_regression_target() -> None:
    cases = [marker_case(70.0), marker_case(None, name="chest", group="h")]
    rng = np.random.default_rng(2)
    s = sample_windows(cases, SMALL, 64, rng, positive_fraction=0.0, augment=False)
    assert torch.all(s.present == 0)
    assert torch.all(torch.isnan(s.offset))
    h, a = SMALL.height_px, SMALL.a_px
    for i in range(64):
        rows = torch.nonzero(s.x[i].amax(dim=1) > 0.7).flatten().numpy()
        if len(rows):  # the L3 bar, when visible, lies outside centre +/- a
            assert np.all(np.abs(rows - h / 2) > a - 2)


def test_augmented_windows_stay_in_range() -> None:
    rng = np.random.default_rng(3)
    s = sample_windows([marker_case(70.0)], SMALL, 16, rng, augment=True)
    assert s.x.shape == (16, SMALL.height_px, SMALL.width_px)
    assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.2


def test_split_by_group_never_puts_a_patient_on_both_sides() -> None:
    cases = [marker_case(70.0, name=f"c{i}", group=f"p{i // 2}") for i in range(20)]
    tr, va = split_by_group(cases, 0.2, seed=0)
    assert len(tr) + len(va) == 20 and va
    assert not {c.group for c in tr} & {c.group for c in va}
    assert [c.name for c in split_by_group(cases, 0.2, seed=0)[1]] == [c.name for c in va]


def test_case_npz_round_trip(tmp_path: Path) -> None:
    c = marker_case(70.5)
    c.landmark_rows = {"T10": 10.0, "S1_top": 120.5}
    save_case(c, tmp_path / "a.npz")
    d = load_case(tmp_path / "a.npz")
    assert d.l3_row == pytest.approx(70.5) and d.group == "g"
    assert d.landmark_rows == {"T10": 10.0, "S1_top": 120.5}
    assert np.array_equal(d.image_hu, np.round(c.image_hu))
    save_case(marker_case(None), tmp_path / "b.npz")
    assert load_case(tmp_path / "b.npz").l3_row is None


def test_read_case_csv_relative_paths_and_not_in_fov(tmp_path: Path) -> None:
    (tmp_path / "cases.csv").write_text(
        "series_path,l3_slice_index,patient_id\ns1,72,P1\n/abs/s2,,P2\ns3,-1,\n"
    )
    rows = read_case_csv(tmp_path / "cases.csv")
    assert rows[0] == (tmp_path / "s1", 72, "P1")
    assert rows[1][1] is None and rows[2][1] is None
    (tmp_path / "bad.csv").write_text("path,index\nx,1\n")
    with pytest.raises(ValueError, match="series_path"):
        read_case_csv(tmp_path / "bad.csv")


@pytest.mark.slow
def test_smoke_training_reduces_the_offset_error_and_saves_loadable_weights(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    cases = [
        marker_case(float(rng.uniform(30, 120)), name=f"c{i}", group=f"p{i}") for i in range(12)
    ]
    cases.append(marker_case(None, name="chest", group="chest"))
    tr, va = split_by_group(cases, 0.25, seed=0)
    settings = TrainSettings(
        epochs=3, steps_per_epoch=25, batch_size=16, lr=3e-3, val_windows=128, seed=0, spec=SMALL
    )
    out = tmp_path / "loc.pt"
    ckpt = tmp_path / "loc.ckpt"
    model, logs = train_locator(
        tr, va, settings, out, {"command": "test"}, max_val_scans=3, checkpoint=ckpt
    )
    assert len(logs) == 3 and out.is_file() and ckpt.is_file()
    # an untrained network of the same seed, on the same validation windows
    from worker.locator.model import build_model

    torch.manual_seed(0)
    fresh = build_model("cnn4", SMALL.height_px, SMALL.width_px)
    val = sample_windows(va, SMALL, 128, np.random.default_rng(5), augment=False)
    before, _ = validate_windows(fresh, val, SMALL, torch.device("cpu"))
    after, _ = validate_windows(model, val, SMALL, torch.device("cpu"))
    assert after < 0.8 * before
    loaded = load_locator(out, "cpu")
    assert loaded.spec == SMALL and loaded.arch == "cnn4" and loaded.record["command"] == "test"
    assert mip_to_strip(cases[0].image_hu, SMALL).shape == (150, SMALL.width_px)


def test_training_can_continue_from_saved_weights_of_the_same_geometry(tmp_path: Path) -> None:
    from worker.locator.model import build_model
    from worker.locator.weights import save_locator

    torch.manual_seed(3)
    src = build_model("cnn4", SMALL.height_px, SMALL.width_px)
    path = tmp_path / "src.pt"
    save_locator(path, src, "cnn4", SMALL, {"command": "test"})
    torch.manual_seed(4)
    dst = build_model("cnn4", SMALL.height_px, SMALL.width_px)
    assert not torch.equal(dst.regressor.weight, src.regressor.weight)
    init_from_locator(dst, path, "cnn4", SMALL)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    other = WindowSpec(pixel_mm=2.0, height_mm=100.0, width_mm=192.0, a_mm=20.0)
    wrong = build_model("cnn4", other.height_px, other.width_px)
    with pytest.raises(ValueError, match="window geometry"):
        init_from_locator(wrong, path, "cnn4", other)


def test_csv_cases_put_l3_on_the_mip_row_of_the_annotated_slice(tmp_path: Path) -> None:
    from worker.volume.load import CTVolume

    (tmp_path / "cases.csv").write_text("series_path,l3_slice_index\na,30\nb,\n")
    z = np.arange(60, dtype=np.float64) * 3.0 + 10.0

    def loader(path: Path) -> CTVolume:
        return CTVolume(hu=np.zeros((60, 8, 40), np.float32), z_mm=z, pixel_spacing_mm=(3.0, 3.0))

    cases = csv_cases(tmp_path / "cases.csv", 3.0, loader)
    assert [c.name for c in cases] == [str(tmp_path / "a"), str(tmp_path / "b")]
    # row 0 is the top slice (z = 187 mm); slice 30 is at z = 100 mm -> row 29
    assert cases[0].l3_row == pytest.approx((z[-1] - z[30]) / 3.0)
    assert cases[1].l3_row is None
    (tmp_path / "bad.csv").write_text("series_path,l3_slice_index\na,99\n")
    with pytest.raises(ValueError, match="outside"):
        csv_cases(tmp_path / "bad.csv", 3.0, loader)


# ------------------------------------------------------------- fields of view (issue 15)

#: Rows (2 mm pixels) of a marker case's levels: T10 and the last rib above L3 (row 70),
#: L2, L4 and the sacrum below.
MARKS = {"T10": 5.0, "last_rib": 25.0, "L2": 52.0, "L4": 88.0, "S1_top": 120.0}


def test_l3_counts_as_in_the_field_of_view_only_where_a_reader_can_count_to_it() -> None:
    case = marker_case(70.0)
    case.landmark_rows = dict(MARKS)
    assert countable_l3(case, None)
    assert countable_l3(case, FovCrop(20.0, 100.0))  # the last rib-bearing vertebra shows
    assert countable_l3(case, FovCrop(40.0, 130.0))  # no ribs, the sacrum shows
    assert not countable_l3(case, FovCrop(40.0, 110.0))  # L2-L4: neither, cannot count
    assert not countable_l3(case, FovCrop(40.0, 121.0))  # the sacrum's top edge only
    assert not countable_l3(case, FovCrop(0.0, 60.0))  # L3 below the crop
    assert not countable_l3(marker_case(None), None)


def test_countability_in_z_follows_the_same_rule_as_in_mip_rows() -> None:
    """countable_in_z (scan z, ascending up) says what countable_l3 (MIP rows of 2 mm,
    down) says for the same crops: z = 300 - 2 row."""
    verts = {"T12": (247.0, 253.0), "L3": (154.0, 166.0), "S1": (50.0, 60.0)}
    case = marker_case(70.0)
    case.landmark_rows = {"last_rib": 25.0, "S1_top": 120.0}
    crops = [(20.0, 100.0), (40.0, 130.0), (40.0, 110.0), (40.0, 121.0), (0.0, 60.0)]
    said = [countable_in_z(verts, 300.0 - 2 * b, 300.0 - 2 * t) for t, b in crops]
    assert said == [countable_l3(case, FovCrop(t, b)) for t, b in crops]
    assert said == [True, True, False, False, False]
    with pytest.raises(KeyError):
        countable_in_z({"T12": (247.0, 253.0)}, 0.0, 300.0)
    # a phantom's table holds numpy floats: the answer is still a plain bool (JSON-ready;
    # repro: evaluate-levels --json failed on numpy's bool after a 16-minute run)
    table = {k: (np.float64(a), np.float64(b)) for k, (a, b) in verts.items()}
    for lo, hi in [(40.0, 260.0), (200.0, 260.0)]:
        assert type(countable_in_z(table, np.float64(lo), np.float64(hi))) is bool


def test_fov_crops_are_drawn_as_scanners_cut_and_relabel_the_windows() -> None:
    case = marker_case(70.0, rows=150)
    case.landmark_rows = dict(MARKS)
    rng = np.random.default_rng(5)
    crops = [draw_fov_crop(case, rng) for _ in range(400)]
    assert all(c is not None and c.top < c.bottom and c.holds(70.0) for c in crops)
    lumbar = [c for c in crops if c.bottom < 88.0 or c.top > 52.0]  # not T10-L2 to L4-end
    lengths_mm = [(c.bottom - c.top) * 2.0 for c in lumbar]
    assert lumbar and min(lengths_mm) >= 150.0 - 1e-6 and max(lengths_mm) <= 260.0 + 1e-6
    assert draw_fov_crop(marker_case(70.0), rng) is None  # no landmarks: never cropped

    s = sample_windows(
        [case], SMALL, 256, rng, positive_fraction=1.0, augment=False, fov_crop_fraction=1.0
    )
    # some positives fall in crops where L3 cannot be counted: presence 0, no target
    present = s.present.numpy()
    assert 0 < present.sum() < len(present)
    assert np.all(np.isnan(s.offset.numpy()[present == 0]))
    assert np.all(~np.isnan(s.offset.numpy()[present == 1]))
    # rows outside the crop are air: some windows end in a run of zeros where the body was
    assert any(float(w[-1].max()) == 0.0 for w in s.x)
    plain = sample_windows([case], SMALL, 64, np.random.default_rng(5), 1.0, augment=False)
    assert torch.all(plain.present == 1)  # without crops every positive stays one


def test_landmarks_follow_the_rib_count() -> None:
    verts = {"T10": (200.0, 220.0), "T11": (225.0, 245.0), "L2": (100.0, 130.0)}
    verts.update({"L4": (40.0, 70.0), "S1": (-21.0, 0.0)})
    marks = landmark_z_mm(verts)
    assert marks == {"T10": 210.0, "last_rib": 235.0, "L2": 115.0, "L4": 55.0, "S1_top": 0.0}


def test_every_nth_training_phantom_has_a_varied_spine(tmp_path: Path) -> None:
    """Domain randomisation of the locator's data (issue 15): with varied_every=2 the first
    of two phantoms has a varied spine (its landmarks move: the column is restacked), is
    cached under its own name, and the second is the seed's plain phantom."""
    from worker.training.locator import phantom_case, phantom_cases

    varied, plain = phantom_cases([11, 12], 3.0, tmp_path, varied_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "phantom-0000011-3mm-lm-sv.npz",
        "phantom-0000012-3mm-lm.npz",
    ]
    same_seed_plain = phantom_case(11, 3.0)
    assert plain.landmark_rows == phantom_case(12, 3.0).landmark_rows
    assert varied.landmark_rows != same_seed_plain.landmark_rows
    assert set(varied.landmark_rows) == set(same_seed_plain.landmark_rows)
    again = phantom_cases([11], 3.0, tmp_path, varied_every=1)[0]  # from the cache
    assert again.landmark_rows == pytest.approx(varied.landmark_rows)
