"""``l3spot convert``: a NIfTI CT volume becomes a DICOM CT series with the same geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from core.config import Config
from core.errors import GantryTiltError
from l3spot import app
from worker.volume.convert import ConversionError, convert_nifti, ras_affine
from worker.volume.load import load_series

#: A non-trivial, oblique-free affine: voxel axis 0 runs to the patient's left (the LPS
#: convention of DICOM-converted files, a flip against RAS), voxel axis 1 runs to the feet
#: (a coronal-stored volume: the slice axis is not the last one), voxel axis 2 runs to the
#: back; non-unit, unequal spacing and an arbitrary origin.
AFFINE = np.array(
    [
        [0.7, 0.0, 0.0, -120.5],
        [0.0, 0.0, -0.9, 80.25],
        [0.0, -2.5, 0.0, -300.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (48, 26, 40)  # (i, j, k) of the file


def _body(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """int16 HU in the file's voxel order: air, a fat ring, soft tissue, a bone core."""
    rng = np.random.default_rng(seed)
    i, _, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    r = np.hypot((i - shape[0] / 2) / (shape[0] / 2.4), (k - shape[2] / 2) / (shape[2] / 2.4))
    hu = np.full(shape, -1000, np.int16)
    hu[r < 1.0] = -100
    hu[r < 0.8] = 40
    hu[r < 0.2] = 500
    return (hu + rng.integers(-20, 21, size=shape)).astype(np.int16)


def _nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray = AFFINE,
    qform: np.ndarray | None = None,
    qform_code: int = 1,
) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine if qform is None else qform, code=qform_code)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def test_round_trip_gives_back_the_hu_volume_and_the_affine(tmp_path: Path) -> None:
    data = _body()
    nii = _nifti(tmp_path / "ct.nii.gz", data)
    report = convert_nifti(nii, tmp_path / "series")
    assert report.n_files == SHAPE[1]  # the slices are the file's second axis (feet-head)
    assert report.max_affine_error_mm < 1e-6

    back = load_series(tmp_path / "series", min_slices=1)
    canon = nib.as_closest_canonical(nib.load(str(nii)))
    np.testing.assert_allclose(ras_affine(back), canon.affine, rtol=0, atol=1e-6)
    ras_data = back.hu.transpose(2, 1, 0)[::-1, ::-1, :]  # ras_affine's voxel order
    np.testing.assert_array_equal(ras_data, np.asarray(canon.dataobj))
    assert back.pixel_spacing_mm == pytest.approx((0.9, 0.7))
    assert back.slice_spacing_mm == pytest.approx(2.5)


def test_every_voxel_lands_where_the_nifti_affine_puts_it(tmp_path: Path) -> None:
    """Independent of the loader: read the files with pydicom, locate voxels by hand."""
    data = _body(seed=1)
    nii = _nifti(tmp_path / "ct.nii", data)
    convert_nifti(nii, tmp_path / "series")
    files = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").glob("*.dcm"))]
    iop = np.asarray(files[0].ImageOrientationPatient, float)
    u, v = iop[:3], iop[3:]
    n = np.cross(u, v)
    by_z = {round(float(np.asarray(ds.ImagePositionPatient, float) @ n), 3): ds for ds in files}
    affine = nib.load(str(nii)).affine  # AFFINE as the file stores it (float32)
    rng = np.random.default_rng(2)
    for i, j, k in zip(*(rng.integers(0, s, 200) for s in SHAPE), strict=True):
        lps = (affine @ [i, j, k, 1.0])[:3] * [-1.0, -1.0, 1.0]
        ds = by_z[round(float(lps @ n), 3)]
        d = lps - np.asarray(ds.ImagePositionPatient, float)
        dy, dx = (float(s) for s in ds.PixelSpacing)
        row, col = d @ v / dy, d @ u / dx
        assert abs(row - round(row)) < 1e-4 and abs(col - round(col)) < 1e-4
        stored = ds.pixel_array[round(row), round(col)]
        hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu == data[i, j, k]


def test_four_d_images_are_refused_and_a_single_volume_is_converted(tmp_path: Path) -> None:
    data = _body()
    four = _nifti(tmp_path / "t2.nii.gz", np.stack([data, data], axis=-1))
    with pytest.raises(ConversionError, match=r"4-D image .*split"):
        convert_nifti(four, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    one = _nifti(tmp_path / "t1.nii.gz", data[..., None])
    assert convert_nifti(one, tmp_path / "b").n_files == SHAPE[1]


def test_non_integer_hu_is_refused_unless_rounding_is_allowed(tmp_path: Path) -> None:
    data = _body().astype(np.float32)
    data[10, 5, 7] += 0.4
    nii = _nifti(tmp_path / "f.nii.gz", data)
    with pytest.raises(ConversionError, match=r"1 of \d+ voxels are not integer HU.*rounded"):
        convert_nifti(nii, tmp_path / "a")
    report = convert_nifti(nii, tmp_path / "b", allow_rounding=True)
    assert report.rounded_voxels == 1
    assert report.max_rounding_hu == pytest.approx(0.4, abs=1e-4)
    back = load_series(tmp_path / "b", min_slices=1)
    canon = nib.as_closest_canonical(nib.load(str(nii)))
    expected = np.rint(np.asarray(canon.dataobj))
    np.testing.assert_array_equal(back.hu.transpose(2, 1, 0)[::-1, ::-1, :], expected)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("qform", "sform and qform disagree"),
        ("no_geometry", "no patient geometry"),
        ("metres", "only millimetres"),
    ],
)
def test_ambiguous_or_missing_geometry_is_refused(tmp_path: Path, change: str, reason: str) -> None:
    data = _body()
    if change == "qform":
        shifted = AFFINE.copy()
        shifted[0, 3] += 5.0
        nii = _nifti(tmp_path / "x.nii.gz", data, qform=shifted)
    else:
        img = nib.Nifti1Image(data, AFFINE)
        if change == "no_geometry":
            img.set_sform(AFFINE, code=0)
            img.set_qform(AFFINE, code=0)
        else:
            img.header.set_xyzt_units("meter")
        nii = tmp_path / "x.nii.gz"
        nib.save(img, str(nii))
    with pytest.raises(ConversionError, match=reason):
        convert_nifti(nii, tmp_path / "out")
    assert not list(tmp_path.glob("out/*.dcm"))


def test_a_sheared_affine_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.005  # slices step 5 um sideways per 2.5 mm: within the loader's shear
    # a qform cannot hold a shear (rotation and zooms only): sform alone, as tools write it
    nii = _nifti(tmp_path / "s.nii.gz", _body(), sheared, qform_code=0)
    with pytest.raises(ConversionError, match="sheared"):
        convert_nifti(nii, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tilted = AFFINE.copy()
    tilted[0, 1] = 0.5  # 11 degrees: a gantry tilt, refused by the loader's rule
    with pytest.raises(GantryTiltError):
        convert_nifti(
            _nifti(tmp_path / "t.nii.gz", _body(), tilted, qform_code=0), tmp_path / "out2"
        )


def test_cli_converts_the_real_case_as_analyze_would(shared_data: Path, tmp_path: Path) -> None:
    from worker.pipeline import load_input

    nii = shared_data / "abdomen_ct_totalseg" / "ct.nii.gz"
    res = CliRunner().invoke(app, ["convert", str(nii), "--out", str(tmp_path / "ct")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "ct").glob("*.dcm"))) == 112
    # the same UIDs as `l3spot analyze` gives the NIfTI file (its generated context)
    volume, _ = load_input(nii, tmp_path / "analyze", Config())
    assert info["series_instance_uid"] == volume.series_instance_uid
    back = load_series(tmp_path / "ct")
    np.testing.assert_allclose(
        ras_affine(back), nib.as_closest_canonical(nib.load(str(nii))).affine, atol=1e-6
    )
    again = CliRunner().invoke(app, ["convert", str(nii), "--out", str(tmp_path / "ct")])
    assert again.exit_code == 2
    assert "already holds DICOM files" in again.output
