"""The CT series writer: valid headers, exact pixels, deterministic UIDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from worker.volume.load import CTVolume, PatientInfo
from worker.volume.write import choose_rescale, slice_normal, write_ct_series


def _volume(nz: int = 6, ny: int = 16, nx: int = 12, seed: int = 0, **kw) -> CTVolume:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 2500, size=(nz, ny, nx)).astype(np.float32)
    defaults = dict(
        hu=hu,
        z_mm=-100.0 + 2.5 * np.arange(nz),
        pixel_spacing_mm=(0.75, 0.8),
        image_position_first=(-190.0, -170.0, -100.0),
        patient=PatientInfo(
            patient_id="PID1", name="Doe^Jane", sex="F", age="063Y", size_m=1.64, weight_kg=58.5
        ),
        study_date="20240102",
        manufacturer="ACME",
    )
    defaults.update(kw)
    return CTVolume(**defaults)


def _read_all(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


def test_writes_one_valid_ct_file_per_slice(tmp_path: Path) -> None:
    vol = _volume()
    out = write_ct_series(vol, tmp_path / "s", uid_seed="seed-1", series_description="phantom")
    assert [f.name for f in out.source_files] == [f"{k:06d}.dcm" for k in range(1, 7)]
    dss = _read_all(out.source_files)
    for k, ds in enumerate(dss):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        assert ds.SOPInstanceUID == out.sop_instance_uids[k]
        assert ds.StudyInstanceUID == out.study_instance_uid
        assert ds.SeriesInstanceUID == out.series_instance_uid
        assert ds.FrameOfReferenceUID == out.frame_of_reference_uid
        assert ds.InstanceNumber == k + 1
        assert ds.Rows == 16 and ds.Columns == 12
        assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.8]
        assert float(ds.SliceThickness) == 2.5
        assert float(ds.SpacingBetweenSlices) == 2.5
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert ds.SeriesDescription == "phantom"
        assert ds.PatientSex == "F" and ds.PatientAge == "063Y"
        assert float(ds.PatientSize) == pytest.approx(1.64)
        assert float(ds.PatientWeight) == pytest.approx(58.5)
        assert ds.PatientID == "PID1" and ds.StudyDate == "20240102"
        assert ds.PatientPosition == "HFS"
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol.hu[k])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(ipp, [-190.0, -170.0, -100.0 + 2.5 * k])
    assert len(set(out.sop_instance_uids)) == 6
    assert out.image_position_first == (-190.0, -170.0, -100.0)
    assert out.hu is vol.hu


def test_uids_are_deterministic_for_a_seed_and_random_without(tmp_path: Path) -> None:
    vol = _volume()
    a = write_ct_series(vol, tmp_path / "a", uid_seed="case-7")
    b = write_ct_series(vol, tmp_path / "b", uid_seed="case-7")
    c = write_ct_series(vol, tmp_path / "c", uid_seed="case-8")
    r1 = write_ct_series(vol, tmp_path / "r1")
    r2 = write_ct_series(vol, tmp_path / "r2")
    assert a.sop_instance_uids == b.sop_instance_uids
    assert a.series_instance_uid == b.series_instance_uid
    assert a.study_instance_uid == b.study_instance_uid
    assert a.series_instance_uid != c.series_instance_uid
    assert r1.series_instance_uid != r2.series_instance_uid
    assert not set(r1.sop_instance_uids) & set(r2.sop_instance_uids)
    for uid in [a.study_instance_uid, a.series_instance_uid, *a.sop_instance_uids]:
        assert uid.startswith("2.25.") and len(uid) <= 64
    # Identical seed -> byte-identical files.
    assert a.source_files[0].read_bytes() == b.source_files[0].read_bytes()


def test_existing_uids_are_kept(tmp_path: Path) -> None:
    vol = _volume(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
        sop_instance_uids=[f"1.2.3.4.{k}" for k in range(6)],
    )
    out = write_ct_series(vol, tmp_path, uid_seed="x")
    ds = pydicom.dcmread(out.source_files[5])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
        "1.2.3",
        "1.2.3.4",
        "1.2.3.5",
    )
    assert ds.SOPInstanceUID == "1.2.3.4.5"


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_other_transfer_syntaxes_are_lossless(tmp_path: Path, ts) -> None:
    vol = _volume(nz=3, ny=64, nx=64)  # OpenJPEG needs more than a few pixels per side
    out = write_ct_series(vol, tmp_path, uid_seed="ts", transfer_syntax=ts)
    for k, ds in enumerate(_read_all(out.source_files)):
        assert ds.file_meta.TransferSyntaxUID == ts
        np.testing.assert_array_equal(ds.pixel_array.astype(np.float32) - 1024.0, vol.hu[k])


def test_oblique_orientation_positions_follow_the_normal(tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    orient = (1.0, 0.0, 0.0, 0.0, c, -s)  # tilted about x
    normal = slice_normal(orient)
    vol = _volume(nz=4, image_orientation=orient, image_position_first=(5.0, 6.0, 7.0))
    out = write_ct_series(vol, tmp_path, uid_seed="o")
    for k, ds in enumerate(_read_all(out.source_files)):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        assert float(ipp @ normal) == pytest.approx(vol.z_mm[k], abs=1e-6)


def test_uneven_spacing_omits_spacing_between_slices(tmp_path: Path) -> None:
    vol = _volume(nz=4, z_mm=np.array([0.0, 1.0, 2.0, 5.0]), slice_thickness_mm=1.0)
    out = write_ct_series(vol, tmp_path, uid_seed="u")
    ds = pydicom.dcmread(out.source_files[0])
    assert "SpacingBetweenSlices" not in ds
    assert float(ds.SliceThickness) == 1.0


def test_rescale_handles_wide_ranges(tmp_path: Path) -> None:
    assert choose_rescale(-1024, 3071) == (1.0, -1024.0)
    slope, intercept = choose_rescale(-40000, 40000)
    assert slope == 2.0
    assert (-40000 - intercept) / slope >= -32768 and (40000 - intercept) / slope <= 32767
    vol = _volume(nz=2)
    vol.hu[0, 0, 0] = -40000
    vol.hu[1, 0, 0] = 40000
    out = write_ct_series(vol, tmp_path, uid_seed="w")
    ds = pydicom.dcmread(out.source_files[1])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(hu - vol.hu[1]).max() <= float(ds.RescaleSlope) / 2


def test_rejects_inconsistent_volumes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="z_mm"):
        write_ct_series(_volume(z_mm=np.zeros(3)), tmp_path)
    with pytest.raises(ValueError, match="ascending"):
        write_ct_series(_volume(nz=3, z_mm=np.array([0.0, 2.0, 1.0])), tmp_path)
    with pytest.raises(ValueError, match="orientation"):
        write_ct_series(_volume(image_orientation=(1, 0, 0, 1, 0, 0)), tmp_path)


def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (dicom3tools, see .ci/run)")
    out = write_ct_series(_volume(nz=2), tmp_path, uid_seed="v")
    res = subprocess.run([exe, str(out.source_files[0])], capture_output=True, text=True)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []
