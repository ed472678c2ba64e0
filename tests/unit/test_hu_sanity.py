"""Values that are not Hounsfield units are refused, never measured (issue 14, defect 2).

Reproductions: a NaN Rescale Intercept was read as 0; stored values (HU + 1024) without
Rescale Intercept/Slope were measured as HU (real case SMA 232.6 cm2 instead of 139.5); a
slope of 0 was taken as 1. Padding outside the scanned circle (-2048, -3024 HU) must not
refuse a series nor change its numbers.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from core.config import CompositionConfig, Config
from core.errors import NotHounsfieldError, SeriesValidationError
from worker import pipeline
from worker.composition.measure import measure_labels, segment_slice
from worker.phantom import PhantomSpec, generate_phantom
from worker.volume.load import load_nifti, load_series
from worker.volume.write import write_ct_series


def _edited_copy(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 (a callable on a Dataset)
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(f)
    return dst


def _raw_unsigned(ds: pydicom.Dataset) -> None:
    """Store HU + 1024 as unsigned values and drop the rescale (what a broken export does)."""
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelData = np.clip(hu + 1024, 0, 65535).astype("<u2").tobytes()
    ds.PixelRepresentation = 0
    del ds.RescaleIntercept
    del ds.RescaleSlope


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("nan_intercept", lambda ds: setattr(ds, "RescaleIntercept", "NaN"), "Intercept"),
        ("inf_slope", lambda ds: setattr(ds, "RescaleSlope", "inf"), "Slope"),
        ("zero_slope", lambda ds: setattr(ds, "RescaleSlope", "0"), "Slope of 0"),
        ("raw_unsigned", _raw_unsigned, "Rescale"),
        ("plus_1024", lambda ds: setattr(ds, "RescaleIntercept", "0"), "not CT Hounsfield"),
    ],
)
def test_series_whose_values_are_not_hu_is_refused(
    phantom_series, tmp_path: Path, name: str, edit, match: str
) -> None:
    series_dir, _ = phantom_series
    folder = _edited_copy(series_dir, tmp_path / name, edit)
    with pytest.raises(NotHounsfieldError, match=match) as err:
        load_series(folder)
    assert isinstance(err.value, SeriesValidationError) and err.value.series_uid


def test_the_analysis_of_a_series_without_rescale_fails_with_the_reason(
    phantom_series, tmp_path: Path
) -> None:
    """A job record gets the reason (worker.tasks records SeriesValidationError.reason)."""
    series_dir, _ = phantom_series
    folder = _edited_copy(series_dir, tmp_path / "raw", _raw_unsigned)
    with pytest.raises(NotHounsfieldError) as err:
        pipeline.analyze_series(folder, tmp_path / "out", Config())
    assert "cannot be read as Hounsfield units" in err.value.reason
    assert not (tmp_path / "out" / "result.json").exists()


def test_nifti_stored_as_hu_plus_1024_is_refused(shared_data: Path, tmp_path: Path) -> None:
    src = nib.load(str(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz"))
    data = np.asarray(src.get_fdata(), dtype=np.float32) + 1024.0
    nib.save(nib.Nifti1Image(data, src.affine), tmp_path / "raw.nii.gz")
    load_nifti(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz")  # the real one passes
    with pytest.raises(NotHounsfieldError, match="median of the tissue voxels"):
        load_nifti(tmp_path / "raw.nii.gz")


@pytest.mark.slow  # about 3 s
def test_padding_outside_the_scan_circle_neither_refuses_nor_changes_the_numbers(
    tmp_path: Path,
) -> None:
    ph = generate_phantom(6001, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
    hu = np.array(ph.volume.hu)
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    outside = (yy - ny / 2 + 0.5) ** 2 + (xx - nx / 2 + 0.5) ** 2 > (min(ny, nx) / 2) ** 2
    k = int(ph.truth.l3_mid_slice_index)
    cfg = CompositionConfig()

    def areas(volume) -> dict[str, float]:  # noqa: ANN001
        sp = tuple(float(v) for v in volume.pixel_spacing_mm)
        labels = segment_slice(volume.hu[k], sp, cfg).labels
        return {key: m.area_cm2 for key, m in measure_labels(labels, volume.hu[k], sp).items()}

    plain = write_ct_series(ph.volume, tmp_path / "plain", uid_seed="pad-plain")
    reference = areas(load_series(tmp_path / "plain"))
    for padding in (-2048.0, -3024.0):
        padded = hu.copy()
        padded[:, outside & (hu[0] < -900)] = padding  # air outside the circle, as scanners pad
        vol = dataclasses.replace(
            plain, hu=padded, sop_instance_uids=[], series_instance_uid="", study_instance_uid=""
        )
        write_ct_series(vol, tmp_path / f"pad{padding:g}", uid_seed=f"pad{padding:g}")
        loaded = load_series(tmp_path / f"pad{padding:g}")
        # padding stays padding (below composition.classical.padding_hu: outside the scan)
        assert np.array_equal(loaded.hu == padding, padded == padding)
        assert areas(loaded) == reference


# --------------------------------------------------------------------------------------------
# Round 2: the histogram must refuse HU + 1024 whatever the amount of air, padding must stay
# padding (the composition's truncation rules read it), Pixel Padding Value is honoured.
# --------------------------------------------------------------------------------------------

LIDC = Path("chest_ct_lidc")


def _real_copy(shared_data: Path, dst: Path, n: int = 24, edit=None) -> Path:  # noqa: ANN001
    """The first ``n`` slices of the real Philips chest series, each edited by ``edit``."""
    dst.mkdir(parents=True)
    files = sorted(
        (shared_data / LIDC).glob("*.dcm"),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for f in files[100 : 100 + n]:  # contiguous slices through the lungs and the chest wall
        ds = pydicom.dcmread(f)
        if edit is not None:
            edit(ds)
        ds.save_as(dst / f.name)
    return dst


def test_real_series_whose_intercept_is_lost_is_refused(shared_data: Path, tmp_path: Path) -> None:
    """Philips stores HU + 1000 (intercept -1000): read with intercept 0, a chest CT is
    mostly air, so the tissue median alone (air at ~0 counted as tissue) let it through."""
    load_series(_real_copy(shared_data, tmp_path / "ok"))  # the real one passes
    lost = _real_copy(
        shared_data, tmp_path / "lost", edit=lambda ds: setattr(ds, "RescaleIntercept", "0")
    )
    with pytest.raises(NotHounsfieldError, match="not CT Hounsfield units"):
        load_series(lost)


@pytest.mark.slow  # about 5 s per phantom
@pytest.mark.parametrize("seed", [6000, 7])
def test_phantom_nifti_plus_1024_is_refused_whatever_its_air(seed: int, tmp_path: Path) -> None:
    ph = generate_phantom(seed, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
    aff = np.diag([-0.8, -0.8, 5.0, 1.0])  # LPS voxel steps as RAS affine
    data = np.ascontiguousarray(ph.volume.hu.transpose(2, 1, 0)[::-1, ::-1])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "ok.nii.gz")
    nib.save(nib.Nifti1Image(data + 1024.0, aff), tmp_path / "raw.nii.gz")
    load_nifti(tmp_path / "ok.nii.gz")
    with pytest.raises(NotHounsfieldError, match="not CT Hounsfield units"):
        load_nifti(tmp_path / "raw.nii.gz")


def test_real_nifti_with_a_wrong_slope_is_refused(shared_data: Path, tmp_path: Path) -> None:
    """Slope 1.5: air lands at -1500 (read as padding) and the lung below air."""
    src = nib.load(str(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz"))
    data = np.asarray(src.get_fdata(), dtype=np.float32) * 1.5
    nib.save(nib.Nifti1Image(data, src.affine), tmp_path / "x1.5.nii.gz")
    with pytest.raises(NotHounsfieldError, match="not CT Hounsfield units: median of the gas"):
        load_nifti(tmp_path / "x1.5.nii.gz")
    from worker.volume.hu import MAX_BELOW_AIR_FRACTION, hu_landmarks

    assert hu_landmarks(data).below_air_fraction > 10 * MAX_BELOW_AIR_FRACTION  # a 2nd reason


@pytest.mark.slow  # about 3 s
def test_nifti_with_values_that_are_not_numbers_is_refused(tmp_path: Path) -> None:
    ph = generate_phantom(6001, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
    data = np.ascontiguousarray(ph.volume.hu.transpose(2, 1, 0)[::-1, ::-1])
    data[:5, :5, :] = np.nan  # e.g. a pipeline that writes NaN outside a mask
    nib.save(nib.Nifti1Image(data, np.diag([-0.8, -0.8, 5.0, 1.0])), tmp_path / "nan.nii.gz")
    with pytest.raises(NotHounsfieldError, match="not finite"):
        load_nifti(tmp_path / "nan.nii.gz")


def _circle_outside(shape: tuple[int, int], radius: float) -> np.ndarray:
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    return (yy - ny / 2 + 0.5) ** 2 + (xx - nx / 2 + 0.5) ** 2 > radius**2


def _segmented(volume, k: int) -> tuple[list[str], dict[str, float]]:  # noqa: ANN001
    sp = tuple(float(v) for v in volume.pixel_spacing_mm)
    seg = segment_slice(volume.hu[k], sp, CompositionConfig())
    areas = {key: m.area_cm2 for key, m in measure_labels(seg.labels, volume.hu[k], sp).items()}
    return sorted(seg.qa_flags), areas


@pytest.fixture(scope="module")
def cut_by_the_circle(tmp_path_factory: pytest.TempPathFactory):
    """Phantom 6003 (a large trunk) reconstructed in a circle that cuts the trunk: padding
    -3024 HU outside it, as scanners write it. Returns (volume in memory, L3 index, folder)."""
    ph = generate_phantom(6003, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
    hu = np.rint(ph.volume.hu)  # the stored integers
    hu[:, _circle_outside(hu.shape[1:], 200.0)] = -3024.0
    vol = dataclasses.replace(ph.volume, hu=hu)
    folder = tmp_path_factory.mktemp("cut") / "s"
    write_ct_series(vol, folder, uid_seed="cut-by-circle")
    return vol, int(ph.truth.l3_mid_slice_index), folder


def test_body_cut_by_the_scan_circle_keeps_its_flag_and_numbers(cut_by_the_circle) -> None:
    """Setting padding to air at load made the circle's edge look like skin: the flag
    body_truncated was lost and SAT/VAT changed (SAT 75.6 -> 86.0 cm2, VAT 233.6 -> 223.9)."""
    vol, k, folder = cut_by_the_circle
    flags, areas = _segmented(vol, k)
    assert "body_truncated" in flags
    loaded = load_series(folder)
    assert loaded.hu.min() < -1500  # padding stays padding
    got_flags, got_areas = _segmented(loaded, k)
    assert got_flags == flags and got_areas == pytest.approx(areas, rel=1e-9)


def _ge_unsigned_padding(ds: pydicom.Dataset, value: int = 63536) -> None:
    """GE style: HU + 1024 stored unsigned, padding stored as 63536 (-2000 as a signed
    16-bit value) and Pixel Padding Value (0028,0120) written SS -2000."""
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    raw = np.clip(hu + 1024, 0, 65535)
    raw[hu <= -1500] = value
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.add_new(0x00280120, "SS", value - 65536 if value > 32767 else value)


def test_pixel_padding_value_that_reads_as_bone_is_padding(
    cut_by_the_circle, tmp_path: Path
) -> None:
    """Stored padding 63536 with intercept -1024 is 62512 'HU': without Pixel Padding Value
    the trunk would touch a wall of metal; with it, the series reads as the signed one."""
    vol, k, folder = cut_by_the_circle
    ge = _edited_copy(folder, tmp_path / "ge", _ge_unsigned_padding)
    assert pydicom.dcmread(next(ge.glob("*.dcm"))).pixel_array.max() == 63536
    loaded = load_series(ge)
    reference = load_series(folder)
    assert loaded.hu.max() < 3072 and loaded.hu.min() < -1500
    assert _segmented(loaded, k) == _segmented(reference, k)
    from worker.mip import frontal_mip

    np.testing.assert_array_equal(frontal_mip(loaded).image, frontal_mip(reference).image)


def test_pixel_padding_range_limit_is_padding(cut_by_the_circle, tmp_path: Path) -> None:
    """Pixel Padding Range Limit (0028,0121): every stored value between it and Pixel
    Padding Value is padding (here 65000..65535: noise-like padding)."""
    vol, k, folder = cut_by_the_circle
    rng = np.random.default_rng(5)

    def edit(ds: pydicom.Dataset) -> None:
        _ge_unsigned_padding(ds, 65535)
        raw = ds.pixel_array.copy()
        pad = raw == 65535
        raw[pad] = rng.integers(65000, 65536, size=int(pad.sum()))
        ds.PixelData = raw.astype("<u2").tobytes()
        del ds[0x00280120]
        ds.add_new(0x00280120, "US", 65535)
        ds.add_new(0x00280121, "US", 65000)

    loaded = load_series(_edited_copy(folder, tmp_path / "range", edit))
    assert loaded.hu.max() < 3072
    assert _segmented(loaded, k) == _segmented(load_series(folder), k)


def test_pixel_padding_value_equal_to_air_changes_nothing(phantom_series, tmp_path: Path) -> None:
    """Pixel Padding Value 0 on unsigned HU + 1024 is -1024 HU: the same value as clipped air
    inside the scan, so it stays air (marking it padding would cut the skin off the air)."""
    series_dir, ph = phantom_series

    def edit(ds: pydicom.Dataset) -> None:
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        ds.PixelData = np.clip(hu + 1024, 0, 65535).astype("<u2").tobytes()
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.add_new(0x00280120, "US", 0)

    loaded = load_series(_edited_copy(series_dir, tmp_path / "air", edit))
    reference = load_series(series_dir)
    np.testing.assert_array_equal(loaded.hu, np.maximum(reference.hu, -1024.0))


PHANTOM_SEEDS_IN_TESTS = (0, 1, 2, 3, 4, 7, 9, 11, 12, 13, 42, *range(6000, 6006))


@pytest.mark.slow
@pytest.mark.parametrize("fov", ["abdomen", "abdomen_pelvis", "chest", "pelvis"])
def test_phantoms_used_in_tests_are_ct_in_hu(fov: str) -> None:
    """Every seed the tests use, each field of view (coarse grids: the histogram only)."""
    from worker.volume.hu import check_hu_histogram

    for seed in PHANTOM_SEEDS_IN_TESTS:
        spec = PhantomSpec(fov=fov, rows=64, cols=64, pixel_spacing_mm=6.0, slice_thickness_mm=10.0)
        check_hu_histogram(f"phantom {seed}", generate_phantom(seed, spec).volume.hu)
