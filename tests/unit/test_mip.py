"""The frontal MIP: projection axis, head-up orientation, physical resampling, row <-> z."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from l3spot import app
from worker.mip import MIP_HU_RANGE, FrontalMips, frontal_mip, frontal_projection
from worker.volume.load import CTVolume, load_series
from worker.volume.write import write_ct_series


def _vol(nz: int = 40, ny: int = 30, nx: int = 50, dz: float = 1.0, dx: float = 1.0, z0=100.0):
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    return CTVolume(hu=hu, z_mm=z0 + dz * np.arange(nz), pixel_spacing_mm=(dx, dx))


def test_max_over_anterior_posterior_axis_head_up() -> None:
    v = _vol()
    v.hu[30, 5, 10] = 500.0  # superior slice, anterior row
    v.hu[30, 25, 10] = 700.0  # same slice and column, posterior: the max wins
    v.hu[5, 12, 40] = 300.0  # inferior slice, patient-left column
    mip = frontal_mip(v, pixel_mm=1.0)
    assert mip.image.shape == (40, 50)
    assert mip.image.dtype == np.float32
    assert mip.z_top_mm == 139.0
    # Head up: the superior slice (z index 30) is near the top (row 39 - 30 = 9).
    assert mip.image[9, 10] == pytest.approx(700.0)
    assert mip.image[34, 40] == pytest.approx(300.0)
    assert float(mip.row_to_z(9)) == 130.0 and mip.row_to_slice_index(9) == 30
    assert np.unravel_index(np.argmax(mip.image), mip.image.shape) == (9, 10)


def test_resampled_to_physical_pixels() -> None:
    v = _vol(nz=21, nx=101, dz=5.0, dx=0.5)  # 100 mm in z, 50 mm in x
    mip = frontal_mip(v, pixel_mm=2.0)
    assert mip.pixel_mm == 2.0
    assert mip.image.shape == (51, 26)
    assert float(mip.row_to_z(mip.rows - 1)) == pytest.approx(v.z_mm[0])


def test_linear_in_z_between_uneven_slices() -> None:
    z = np.array([0.0, 1.0, 2.0, 5.0, 6.0, 10.0])
    v = CTVolume(
        hu=np.broadcast_to((z * 10.0)[:, None, None], (6, 4, 8)).astype(np.float32),
        z_mm=z,
        pixel_spacing_mm=(1.0, 1.0),
    )
    mip = frontal_mip(v, pixel_mm=1.0)
    zr = np.asarray(mip.row_to_z(np.arange(mip.rows)))
    # HU = 10 * z is linear in z, so interpolation recovers it exactly at every row (the
    # anti-aliasing blur is off because the output is finer than the median slice step).
    np.testing.assert_allclose(mip.image[:, 3], 10.0 * zr, atol=1e-4)
    assert mip.row_to_slice_index(mip.z_to_row(3.4)) == 2  # nearest real slice: z = 2
    assert mip.row_to_slice_index(mip.z_to_row(3.6)) == 3  # z = 5
    assert mip.row_to_slice_index(mip.z_to_row(3.4) + 2) == 1  # z = 1.4 -> slice 1


def test_row_and_z_are_inverse() -> None:
    mip = frontal_mip(_vol(dz=2.5), pixel_mm=1.5)
    rows = np.array([0.0, 3.5, 17.0])
    np.testing.assert_allclose(mip.z_to_row(mip.row_to_z(rows)), rows)


def test_thin_bright_band_survives_downsampling() -> None:
    v = _vol(nz=200, nx=200, dz=0.5, dx=0.5)
    v.hu[101:105, 15, :] = 1500.0  # a 2 mm "rib" running left-right, 4 slices of 0.5 mm
    mip = frontal_mip(v, pixel_mm=2.0)  # anti-aliasing blur of sigma 1.5 slices
    row = int(round(float(mip.z_to_row(v.z_mm[102]))))
    peak = mip.image[row - 1 : row + 2, 5:-5].max(axis=0)
    assert peak.min() > -1000 + 0.6 * 2500
    assert np.all(mip.image[: row - 4] < -990) and np.all(mip.image[row + 4 :] < -990)


def test_clipped_to_the_hu_range() -> None:
    v = _vol()
    v.hu[:] = -3024.0  # padding outside the field of view
    v.hu[10, 3, 3] = 10000.0
    mip = frontal_mip(v, pixel_mm=1.0)
    assert mip.image.min() == MIP_HU_RANGE[0] and mip.image.max() == MIP_HU_RANGE[1]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        frontal_mip(_vol(), pixel_mm=0)
    with pytest.raises(ValueError, match="2 slices"):
        frontal_mip(_vol(nz=1), pixel_mm=1.0)


def test_one_projection_serves_every_pixel_size_with_identical_mips() -> None:
    v = _vol(nz=60, nx=80, dz=1.25, dx=0.7)
    rng = np.random.default_rng(0)
    v.hu[:] = rng.uniform(-1000, 1500, v.hu.shape).astype(np.float32)
    calls: list[int] = []

    def counting(volume: CTVolume):  # noqa: ANN202
        calls.append(1)
        return frontal_projection(volume)

    mips = FrontalMips(v, counting)
    for px in (3.0, 1.0, 3.0, 2.0, 1.0):
        got, want = mips.at(px), frontal_mip(v, pixel_mm=px)
        assert np.array_equal(got.image, want.image) and got.pixel_mm == want.pixel_mm
        assert got.z_top_mm == want.z_top_mm and np.array_equal(got.slice_z_mm, want.slice_z_mm)
    assert calls == [1] and mips.projections == 1
    assert mips.pixel_sizes == (3.0, 1.0, 2.0)
    assert mips.at(3.0) is mips.at(3.0)  # resampled once per pixel size
    with pytest.raises(ValueError, match="positive"):
        mips.at(0.0)
    with pytest.raises(ValueError, match="2 slices"):
        FrontalMips(_vol(nz=1)).at(1.0)


def test_real_abdomen_l3_rows_map_back_to_l3_slices(shared_data: Path) -> None:
    folder = shared_data / "abdomen_ct_totalseg"
    vol = load_series(folder / "ct.nii.gz")
    seg = load_series(folder / "segmentation_total.nii.gz", check_hu=False)  # a label map
    mip = frontal_mip(vol, pixel_mm=1.0)
    assert mip.image.shape == (334, 364)  # 333 mm x 363 mm
    l3 = np.nonzero((seg.hu == 29).any(axis=(1, 2)))[0]
    rows = mip.z_to_row(vol.z_mm[l3])
    assert [mip.row_to_slice_index(r) for r in rows] == list(l3)
    # Spine near the middle column, bone bright around mid-L3 (slice 72).
    row72 = int(round(float(mip.z_to_row(vol.z_mm[72]))))
    spine_cols = np.nonzero(mip.image[row72] > 300)[0]
    assert abs(float(np.median(spine_cols)) - mip.image.shape[1] / 2) < 40


def test_cli_mip_writes_a_png(tmp_path: Path) -> None:
    v = _vol(nz=30, ny=20, nx=40, dz=2.0, dx=0.8)
    v.hu[:, 6:16, 12:30] = 40.0  # a body of soft tissue (the loader refuses an all-air volume)
    v.hu[:, 6:8, 12:30] = -100.0  # under a layer of fat (and one without fat)
    v.hu[24:27, 10, 3:8] = 1500.0  # bright, superior, patient right
    write_ct_series(v, tmp_path / "s", uid_seed="mip")
    out = tmp_path / "mip.png"
    res = CliRunner().invoke(app, ["mip", str(tmp_path / "s"), "--png", str(out)])
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(out))
    assert img.dtype == np.uint8 and img.shape == (59, 32)
    r, c = np.unravel_index(np.argmax(img), img.shape)
    assert img.max() == 255 and r < 15 and c < 8  # head up, patient right on the left
    assert img.min() == 0  # air is black in the bone window
    res = CliRunner().invoke(
        app, ["mip", str(tmp_path / "s"), "--png", str(out), "--window", "nope"]
    )
    assert res.exit_code != 0


def test_cli_mip_reports_invalid_series(tmp_path: Path) -> None:
    v = _vol(nz=4)
    v.image_orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    write_ct_series(v, tmp_path / "s", uid_seed="sag")
    res = CliRunner().invoke(app, ["mip", str(tmp_path / "s"), "--png", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert "sagittal" in res.output
