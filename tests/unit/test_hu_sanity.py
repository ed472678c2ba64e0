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
        assert loaded.hu.min() >= -1100 and any("padding" in w for w in loaded.warnings)
        assert areas(loaded) == reference
