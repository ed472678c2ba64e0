"""Loading CT series: DICOM folders (validation, geometry, decoding) and NIfTI files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from core.errors import NotHounsfieldError, SeriesValidationError
from worker.volume.load import (
    CTVolume,
    DuplicatePositionError,
    GantryTiltError,
    InconsistentGeometryError,
    MissingIdentifierError,
    MixedSeriesError,
    NonAxialError,
    NotCTError,
    PatientInfo,
    SliceGapError,
    SliceHeader,
    TooFewSlicesError,
    UnreadableFileError,
    _FallbackError,
    _fast_header,
    load_nifti,
    load_series,
    read_series_headers,
    slice_normal,
)
from worker.volume.write import write_ct_series

N = 24  # slices of the synthetic series (>= the default minimum of 20)


def _volume(nz: int = N, ny: int = 20, nx: int = 18, **kw) -> CTVolume:
    rng = np.random.default_rng(nz * 1000 + ny)
    # CT-like values over the whole range: soft tissue and fat, with air and bone voxels
    # (the loader refuses a volume whose histogram is not that of a CT in HU)
    shape = (nz, ny, nx)
    hu = rng.integers(-150, 150, size=shape).astype(np.float32)
    draw = rng.random(shape)
    hu[draw < 0.15] = rng.integers(-1024, -900, size=shape)[draw < 0.15]
    hu[draw > 0.85] = rng.integers(200, 2000, size=shape)[draw > 0.85]
    hu[:, 0, 0] = np.arange(nz)  # a per-slice fingerprint
    defaults = dict(
        hu=hu,
        z_mm=-300.0 + 1.5 * np.arange(nz),
        pixel_spacing_mm=(0.7, 0.75),
        image_position_first=(-180.0, -150.0, -300.0),
        patient=PatientInfo(patient_id="P", sex="M", age="045Y", size_m=1.8, weight_kg=82.0),
        slice_thickness_mm=1.5,
        manufacturer="ACME",
        study_date="20230405",
    )
    defaults.update(kw)
    return CTVolume(**defaults)


def _write(tmp_path: Path, name: str = "s", **kw) -> tuple[CTVolume, Path]:
    vol = _volume(**kw)
    out = write_ct_series(vol, tmp_path / name, uid_seed=name, series_description="synthetic")
    return out, tmp_path / name


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _fingerprints(vol: CTVolume) -> list[int]:
    """The value each test series writes into the first stored pixel of each slice."""
    return [int(v) for v in vol.in_plane.to_source(vol.hu)[:, 0, 0]]


# ---------------------------------------------------------------- round trip with the writer


def test_round_trip_restores_hu_geometry_uids_and_patient(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    vol = load_series(folder)
    np.testing.assert_array_equal(vol.hu, written.hu)
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.z_mm, written.z_mm, atol=1e-9)
    assert vol.pixel_spacing_mm == (0.7, 0.75)
    assert vol.sop_instance_uids == written.sop_instance_uids
    assert vol.series_instance_uid == written.series_instance_uid
    assert vol.study_instance_uid == written.study_instance_uid
    assert vol.frame_of_reference_uid == written.frame_of_reference_uid
    assert vol.source_files == written.source_files
    assert vol.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert vol.image_position_first == pytest.approx((-180.0, -150.0, -300.0))
    assert vol.patient.sex == "M" and vol.patient.age == "045Y"
    assert vol.patient.size_m == pytest.approx(1.8) and vol.patient.weight_kg == 82.0
    assert vol.slice_thickness_mm == 1.5 and vol.slice_spacing_mm == pytest.approx(1.5)
    assert vol.series_description == "synthetic" and vol.manufacturer == "ACME"
    assert vol.study_date == "20230405" and vol.modality == "CT"
    assert vol.warnings == []


def test_round_trip_rounds_to_integer_hu(tmp_path: Path) -> None:
    v = _volume(nz=N)
    v.hu[3, 5, 5] = 12.4
    v.hu[3, 5, 6] = -7.6
    write_ct_series(v, tmp_path / "r", uid_seed="r")
    vol = load_series(tmp_path / "r")
    assert vol.hu[3, 5, 5] == 12.0 and vol.hu[3, 5, 6] == -8.0


@pytest.mark.parametrize(
    "ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEG2000Lossless]
)
def test_transfer_syntaxes_decode_to_the_same_hu(tmp_path: Path, ts) -> None:
    vol = _volume(ny=64, nx=64)  # OpenJPEG needs more than a few pixels per side
    write_ct_series(vol, tmp_path / "s", uid_seed="ts", transfer_syntax=ts)
    loaded = load_series(tmp_path / "s")
    np.testing.assert_array_equal(loaded.hu, vol.hu)


def test_slices_sorted_by_position_not_instance_number_or_file_name(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    # Scramble: nested folders, random names, instance numbers reversed.
    rng = np.random.default_rng(1)
    for k, f in enumerate(written.source_files):
        _edit(f, InstanceNumber=N - k)
        sub = folder / f"sub{k % 3}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        f.rename(sub / f"IMG{rng.integers(1e9)}")
    vol = load_series(folder)
    assert _fingerprints(vol) == list(range(N))
    np.testing.assert_allclose(vol.z_mm, written.z_mm)


def test_slice_normal_pointing_to_the_feet_still_sorts_inferior_first(tmp_path: Path) -> None:
    # Column cosines (0,-1,0): row x col = (0,0,-1). Slice 0 must still be the most inferior.
    written, folder = _write(tmp_path, image_orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    vol = load_series(folder)
    ipp_z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in vol.source_files]
    assert ipp_z == sorted(ipp_z)
    assert np.all(np.diff(vol.z_mm) > 0)
    assert _fingerprints(vol) == list(range(N))
    np.testing.assert_allclose(slice_normal(vol.image_orientation), [0, 0, 1])


def test_uneven_spacing_and_a_gap_of_exactly_twice_the_median_are_accepted(tmp_path: Path) -> None:
    z = -300.0 + 1.5 * np.arange(N)
    z[10:] += 1.5  # one missing slice: a 3.0 mm step
    _, folder = _write(tmp_path, z_mm=z)
    vol = load_series(folder)
    np.testing.assert_allclose(vol.z_mm, z)


def test_small_in_plane_rotation_and_obliquity_are_accepted(tmp_path: Path) -> None:
    a = np.radians(2.0)  # 2 degrees about x: within MAX_OBLIQUITY_DEG, stacked along the normal
    orient = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))
    written, folder = _write(tmp_path, image_orientation=orient)
    vol = load_series(folder)
    np.testing.assert_allclose(vol.z_mm, written.z_mm, atol=1e-6)


def test_patient_size_in_centimetres_is_converted_with_a_warning(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    for f in written.source_files:
        _edit(f, PatientSize="172")
    vol = load_series(folder)
    assert vol.patient.size_m == pytest.approx(1.72)
    assert any("centimetres" in w for w in vol.warnings)
    assert not any("172" in w or "1.72" in w for w in vol.warnings)  # the attribute, no value


def test_read_series_headers_is_header_only(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    (folder / "notes.txt").write_text("not dicom")
    heads = read_series_headers(folder)
    assert len(heads) == N
    h = sorted(heads, key=lambda h: h.instance_number or 0)[0]
    assert h.series_instance_uid == written.series_instance_uid
    assert h.modality == "CT" and h.rows == 20 and h.columns == 18
    assert h.image_position == pytest.approx((-180.0, -150.0, -300.0))
    assert h.pixel_offset is not None and h.has_pixel_data


# ---------------------------------------------------------------- validation, synthetic cases


def test_non_dicom_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    _, folder = _write(tmp_path)
    (folder / "README.txt").write_text("hello")
    (folder / "empty.dcm").write_bytes(b"")
    vol = load_series(folder)
    assert vol.shape[0] == N
    assert sorted(w.split(":")[0] for w in vol.warnings) == [
        "skipped README.txt",
        "skipped empty.dcm",
    ]


def test_truncated_dicom_file_is_an_error(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    f = written.source_files[5]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UnreadableFileError, match=f.name) as e:
        load_series(folder)
    assert e.value.series_uid == written.series_instance_uid


def test_undecodable_compressed_pixels_are_an_error(tmp_path: Path) -> None:
    vol = _volume(ny=64, nx=64)
    written = write_ct_series(vol, tmp_path / "j", uid_seed="j", transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(written.source_files[2])
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 100])
    ds.save_as(written.source_files[2])
    with pytest.raises(UnreadableFileError, match="cannot decode"):
        load_series(tmp_path / "j")


def test_not_ct(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    _edit(written.source_files[0], Modality="MR")
    with pytest.raises(NotCTError, match="CT/MR|MR/CT") as e:
        load_series(folder)
    assert e.value.series_uid == written.series_instance_uid


def test_localizer_is_not_axial(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    for f in written.source_files:
        _edit(f, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(NonAxialError, match="localizer"):
        load_series(folder)


def test_mixed_series(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    _edit(written.source_files[3], SeriesInstanceUID="1.2.3.4")
    with pytest.raises(MixedSeriesError, match="2 series") as e:
        load_series(folder)
    assert "1.2.3.4 (1)" in str(e.value) and f"{written.series_instance_uid} ({N - 1})" in str(
        e.value
    )


def test_mixed_studies(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    _edit(written.source_files[3], StudyInstanceUID="1.2.3.4")
    with pytest.raises(MixedSeriesError, match="Study"):
        load_series(folder)


@pytest.mark.parametrize(
    ("orientation", "plane"),
    [((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "sagittal"), ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "coronal")],
)
def test_sagittal_and_coronal_are_not_axial(tmp_path: Path, orientation, plane) -> None:
    _, folder = _write(tmp_path, image_orientation=orientation)
    with pytest.raises(NonAxialError, match=plane):
        load_series(folder)


def test_oblique_beyond_the_limit_is_not_axial(tmp_path: Path) -> None:
    a = np.radians(20.0)
    orient = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))
    _, folder = _write(tmp_path, image_orientation=orient)  # stacked along its normal
    with pytest.raises(NonAxialError, match="oblique slices 20.0 degrees"):
        load_series(folder)


def test_gantry_tilt_sheared_stack(tmp_path: Path) -> None:
    a = np.radians(12.0)
    orient = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))
    written, folder = _write(tmp_path, image_orientation=orient)
    for k, f in enumerate(written.source_files):  # table motion: positions step along z only
        _edit(f, ImagePositionPatient=[-180.0, -150.0, -300.0 + 1.5 * k])
    with pytest.raises(GantryTiltError, match="12.0 degrees"):
        load_series(folder)


def test_gantry_tilt_tag_with_tilted_orientation(tmp_path: Path) -> None:
    a = np.radians(3.0)  # within the obliquity limit, but declared as gantry tilt
    orient = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))
    written, folder = _write(tmp_path, image_orientation=orient)
    for f in written.source_files:
        _edit(f, GantryDetectorTilt="3")
    with pytest.raises(GantryTiltError, match="tilt of 3.0 degrees"):
        load_series(folder)


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        (dict(Rows=16), "mixed image sizes"),
        (dict(PixelSpacing=[0.7, 0.8]), "mixed Pixel Spacing"),
        (dict(ImageOrientationPatient=[1, 0, 0, 0, 0.99, 0.14]), "mixed Image Orientation"),
    ],
)
def test_inconsistent_geometry(tmp_path: Path, attrs, match) -> None:
    written, folder = _write(tmp_path)
    if "Rows" in attrs:  # keep the file decodable: crop its pixels too
        ds = pydicom.dcmread(written.source_files[7])
        ds.PixelData = ds.pixel_array[:16].tobytes()
        ds.Rows = 16
        ds.save_as(written.source_files[7])
    else:
        _edit(written.source_files[7], **attrs)
    with pytest.raises(InconsistentGeometryError, match=match):
        load_series(folder)


def test_missing_position_is_inconsistent_geometry(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    ds = pydicom.dcmread(written.source_files[2])
    del ds.ImagePositionPatient
    ds.save_as(written.source_files[2])
    with pytest.raises(InconsistentGeometryError, match="Image Position"):
        load_series(folder)


def test_identical_duplicate_is_dropped_with_a_warning(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    src = written.source_files[4]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    ds.save_as(folder / "zz_copy.dcm")
    vol = load_series(folder)
    assert vol.shape[0] == N
    assert _fingerprints(vol) == list(range(N))
    assert vol.source_files[4] == src  # the first file by path is kept
    assert len(vol.warnings) == 1 and "dropped zz_copy.dcm" in vol.warnings[0]


def test_same_file_twice_is_dropped(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    shutil.copy(written.source_files[0], folder / "again.dcm")
    vol = load_series(folder)
    assert vol.shape[0] == N and "dropped" in vol.warnings[0]


def test_different_pixels_at_one_position_are_an_error(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    ds = pydicom.dcmread(written.source_files[4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    arr = ds.pixel_array.copy()
    arr[3, 3] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(folder / "zz_other.dcm")
    with pytest.raises(DuplicatePositionError, match="2 slices with different pixels"):
        load_series(folder)


def test_gap_larger_than_twice_the_median_is_an_error(tmp_path: Path) -> None:
    z = -300.0 + 1.5 * np.arange(N)
    z[10:] += 3.1  # a 4.6 mm step
    _, folder = _write(tmp_path, z_mm=z)
    with pytest.raises(SliceGapError, match="4.6 mm"):
        load_series(folder)
    assert load_series(folder, max_gap_ratio=None).shape[0] == N


def test_too_few_slices_is_configurable(tmp_path: Path) -> None:
    _, folder = _write(tmp_path, nz=5)
    with pytest.raises(TooFewSlicesError, match="5 slice"):
        load_series(folder)
    assert load_series(folder, min_slices=5).shape[0] == 5


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(TooFewSlicesError, match="no DICOM images"):
        load_series(tmp_path)


@pytest.mark.parametrize("attr", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_identifiers(tmp_path: Path, attr: str) -> None:
    written, folder = _write(tmp_path)
    for f in written.source_files:
        _edit(f, **{attr: ""})
    with pytest.raises(MissingIdentifierError, match="empty"):
        load_series(folder)
    assert load_series(folder, require_uids=False).shape[0] == N


def test_duplicate_sop_instance_uid_for_different_images(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    _edit(written.source_files[1], SOPInstanceUID=written.sop_instance_uids[0])
    with pytest.raises(MissingIdentifierError, match="used by 2"):
        load_series(folder)


def test_errors_are_series_validation_errors() -> None:
    for cls in (
        NotCTError,
        MixedSeriesError,
        NonAxialError,
        GantryTiltError,
        InconsistentGeometryError,
        DuplicatePositionError,
        SliceGapError,
        TooFewSlicesError,
        MissingIdentifierError,
        UnreadableFileError,
    ):
        assert issubclass(cls, SeriesValidationError)


def test_paths_that_are_not_series(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_series(tmp_path / "nope")
    f = tmp_path / "one.dcm"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_series(f)


# ---------------------------------------------------------------- real edge cases


EDGE = "dicom_edge_cases"


def test_real_gantry_tilt(shared_data: Path) -> None:
    with pytest.raises(GantryTiltError, match=r"14\.0 degrees") as e:
        load_series(shared_data / EDGE / "gantrytilting")
    assert e.value.series_uid.endswith("512040321185")


def test_real_not_a_volume_is_four_different_images_at_one_position(shared_data: Path) -> None:
    with pytest.raises(DuplicatePositionError, match="4 slices with different pixels"):
        load_series(shared_data / EDGE / "notavolume")


def test_real_sliceincrement_folder_mixes_two_series(shared_data: Path) -> None:
    with pytest.raises(MixedSeriesError, match="2 series in one folder"):
        load_series(shared_data / EDGE / "sliceincrement")


def test_real_sliceincrement_ge_part(shared_data: Path) -> None:
    folder = shared_data / EDGE / "sliceincrement" / "001"
    with pytest.raises(TooFewSlicesError, match="4 slice"):
        load_series(folder)
    # This slab holds gas only (all values -1024..-770 HU): no body to measure
    with pytest.raises(NotHounsfieldError, match="no body"):
        load_series(folder, min_slices=2)
    # Steps of 5, 5 and 10 mm: one missing slice (exactly 2 x the median) is tolerated.
    vol = load_series(folder, min_slices=2, check_hu=False)
    np.testing.assert_allclose(vol.z_mm, [18.1075, 23.1075, 28.107498, 38.107498])
    assert vol.pixel_spacing_mm == pytest.approx((0.429688006639, 0.429688006639))


def test_real_sliceincrement_siemens_part_is_tilted(shared_data: Path) -> None:
    with pytest.raises(GantryTiltError, match=r"15\.5 degrees"):
        load_series(shared_data / EDGE / "sliceincrement" / "002", min_slices=2)


def test_real_sliceincrement_skips_the_nifti_files(shared_data: Path) -> None:
    heads = read_series_headers(shared_data / EDGE / "sliceincrement")
    assert len(heads) == 8  # the two .nii.gz files are not DICOM
    assert len({h.series_instance_uid for h in heads}) == 2


def test_real_duplicate_positions(shared_data: Path) -> None:
    folder = shared_data / EDGE / "duplicate_positions"
    # A sparse subset of a series: after the identical duplicate is dropped, gaps remain.
    with pytest.raises(SliceGapError, match="112 mm"):
        load_series(folder)
    vol = load_series(folder, min_slices=2, max_gap_ratio=None)
    assert vol.shape == (10, 512, 512)
    assert "dropped CT28.dcm: identical pixels to CT26.dcm at z = -90.00 mm" in vol.warnings
    assert "skipped CITATION.txt: not a DICOM file (no DICM prefix)" in vol.warnings
    assert vol.z_mm[0] == -512.5 and vol.z_mm[-1] == -42.5


def test_real_jpeg2000_series_with_empty_uids(shared_data: Path) -> None:
    folder = shared_data / "thorax_ct_siemens_j2k"
    with pytest.raises(MissingIdentifierError, match="20 of 20 image.*empty SOP Instance UID"):
        load_series(folder)
    vol = load_series(folder, require_uids=False)
    assert vol.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.z_mm, np.arange(-804.5, -766.0, 2.0))
    assert vol.pixel_spacing_mm == (0.9765625, 0.9765625) and vol.slice_thickness_mm == 3.0
    ds = pydicom.dcmread(vol.source_files[7])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.hu[7], ref)
    assert vol.hu.min() > -1100 and vol.hu.max() > 1000  # air and bone
    assert vol.warnings == ["skipped LICENSE: not a DICOM file (no DICM prefix)"]


def test_real_chest_ct(shared_data: Path) -> None:
    vol = load_series(shared_data / "chest_ct_lidc")
    assert vol.shape == (275, 512, 512)
    assert vol.pixel_spacing_mm == (0.78125, 0.78125)
    np.testing.assert_allclose(np.diff(vol.z_mm), 1.0, atol=1e-4)
    assert vol.z_mm[0] == pytest.approx(-679.800049) and vol.z_mm[-1] == pytest.approx(-405.800049)
    assert vol.slice_thickness_mm == 1.0
    assert vol.patient.sex == "F" and vol.manufacturer == "Philips"
    assert len(set(vol.sop_instance_uids)) == 275 and vol.series_instance_uid.endswith("275227")
    assert any("275 Frame of Reference UIDs" in w for w in vol.warnings)
    # Pixels as pydicom decodes them (12 bits stored, unsigned, intercept -1000).
    ds = pydicom.dcmread(vol.source_files[100])
    ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.hu[100], ref)
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(vol.z_mm[100])
    # Lungs (air) in the middle slice, bone somewhere.
    mid = vol.hu[137]
    assert (mid < -800).mean() > 0.2 and vol.hu.max() > 1000


# ---------------------------------------------------------------- NIfTI


def test_real_nifti_abdomen(shared_data: Path) -> None:
    folder = shared_data / "abdomen_ct_totalseg"
    vol = load_series(folder / "ct.nii.gz")
    assert vol.shape == (112, 101, 122)
    np.testing.assert_allclose(np.diff(vol.z_mm), 3.0)
    assert vol.pixel_spacing_mm == (3.0, 3.0)
    assert vol.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert vol.sop_instance_uids == [] and vol.series_instance_uid == ""
    assert vol.hu.min() == -1207 and vol.hu.max() == 3382
    # z index k of the NIfTI is slice k; the L3 label (29) lands on slices 65..79.
    seg = load_nifti(folder / "segmentation_total.nii.gz", check_hu=False)  # a label map
    assert seg.hu.shape == vol.hu.shape
    np.testing.assert_array_equal(seg.z_mm, vol.z_mm)
    l3 = np.nonzero((seg.hu == 29).any(axis=(1, 2)))[0]
    assert (l3.min(), l3.max()) == (65, 79)
    raw = np.asarray(nib.load(folder / "ct.nii.gz").dataobj)
    np.testing.assert_array_equal(vol.hu[72], raw[::-1, ::-1, 72].T)

    # Radiological layout: patient's right on image columns < left; anterior rows first.
    def centroid(label: int) -> tuple[float, float]:
        r, c = np.nonzero((seg.hu == label).any(axis=0))
        return float(r.mean()), float(c.mean())

    assert centroid(2)[1] < centroid(3)[1]  # kidney_right left of kidney_left
    assert centroid(5)[1] < centroid(1)[1]  # liver (right) left of spleen (left)
    assert centroid(52)[0] < centroid(29)[0]  # aorta anterior to (above) L3
    # First voxel position in LPS: the RAS voxel (nx-1, ny-1, 0).
    assert vol.image_position_first == pytest.approx((-185.04367, -311.319, 94.30176), abs=1e-4)


def test_nifti_orientation_does_not_change_the_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(-150, 150, size=(10, 12, 25)).astype(np.int16)  # (i, j, k) RAS
    aff = np.diag([0.8, 0.9, 2.0, 1.0])
    aff[:3, 3] = (-50.0, -60.0, 100.0)
    ras = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), ras)
    # The same image stored LPS (i and j flipped) and with axes permuted (k, i, j).
    lps = nib.Nifti1Image(data, aff).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    nib.save(lps, tmp_path / "lps.nii")
    perm = nib.Nifti1Image(data, aff).as_reoriented(np.array([[2, 1], [0, 1], [1, 1]]))
    nib.save(perm, tmp_path / "perm.nii.gz")
    a = load_nifti(ras)
    for f in ("lps.nii", "perm.nii.gz"):
        b = load_nifti(tmp_path / f)
        np.testing.assert_array_equal(b.hu, a.hu)
        np.testing.assert_allclose(b.z_mm, a.z_mm)
        assert b.pixel_spacing_mm == pytest.approx(a.pixel_spacing_mm)
        assert b.image_position_first == pytest.approx(a.image_position_first)
    assert a.pixel_spacing_mm == pytest.approx((0.9, 0.8))
    np.testing.assert_allclose(a.z_mm, 100.0 + 2.0 * np.arange(25))


def test_nifti_written_as_dicom_round_trips(tmp_path: Path) -> None:
    data = np.random.default_rng(4).integers(-150, 150, size=(8, 9, 22)).astype(np.int16)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    aff[:3, 3] = (10.0, -20.0, 30.0)
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "v.nii.gz")
    a = load_series(tmp_path / "v.nii.gz")
    write_ct_series(a, tmp_path / "dcm", uid_seed="n")
    b = load_series(tmp_path / "dcm")
    np.testing.assert_array_equal(b.hu, a.hu)
    np.testing.assert_allclose(b.z_mm, a.z_mm, atol=1e-6)
    assert b.image_position_first == pytest.approx(a.image_position_first, abs=1e-6)
    assert b.pixel_spacing_mm == pytest.approx(a.pixel_spacing_mm)


def test_nifti_errors(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 5, 2), np.int16), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(UnreadableFileError, match="3-D"):
        load_series(tmp_path / "4d.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 5), np.int16), np.eye(4)), tmp_path / "few.nii")
    with pytest.raises(TooFewSlicesError):
        load_series(tmp_path / "few.nii")
    # all zeros: not a CT histogram (refused by default), the slice count is what is tested
    assert load_series(tmp_path / "few.nii", min_slices=5, check_hu=False).shape == (5, 4, 4)
    sag = np.eye(4)[[2, 1, 0, 3]]  # voxel axis k along patient x: a sagittal stack
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 30), np.int16), sag), tmp_path / "sag.nii")
    # Reoriented to the closest canonical axes, this is an axial volume with 4 slices.
    assert load_series(tmp_path / "sag.nii", min_slices=1, check_hu=False).shape == (4, 4, 30)
    (tmp_path / "bad.nii.gz").write_bytes(b"nope")
    with pytest.raises(UnreadableFileError, match="bad.nii.gz"):
        load_series(tmp_path / "bad.nii.gz")


# ---------------------------------------------------------------- fast header parser


def _headers_agree(path: Path) -> SliceHeader:
    import dataclasses

    fast = _fast_header(path).header
    assert fast is not None
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    ref = SliceHeader.from_dataset(path, ds, has_pixel_data=True, pixel_offset=fast.pixel_offset)
    assert dataclasses.asdict(fast) == dataclasses.asdict(ref)
    return fast


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, None])
def test_fast_parser_skips_nested_sequences(tmp_path: Path, ts) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    written, folder = _write(tmp_path, nz=N)
    for f in written.source_files:
        ds = pydicom.dcmread(f)
        inner = Dataset()
        inner.CodeValue = "123"
        inner.CodeMeaning = "x" * 60
        inner.TextValue = "y" * 3000  # UT: a 4-byte length in explicit VR
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3"
        item.PurposeOfReferenceCodeSequence = Sequence([inner, inner])
        ds.ReferencedImageSequence = Sequence([item, item])  # (0008,1140), before the wanted
        ds["ReferencedImageSequence"].is_undefined_length = True
        ds.SourceImageSequence = Sequence([item])  # (0008,2112), defined length
        ds.add_new(0x00091010, "OB", b"\x01" * 5000)  # a private blob
        ds.add_new(0x00090010, "LO", "ACME private")
        ds.SeriesDescription = "Thorax ü"
        if ts is not None:
            ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(f, implicit_vr=ts is not None, little_endian=True)
    h = _headers_agree(written.source_files[3])
    assert h.series_description == "Thorax ü" and h.pixel_offset is not None
    vol = load_series(folder)
    np.testing.assert_array_equal(vol.hu, written.hu)


def test_fast_parser_leaves_unusual_character_sets_to_pydicom(tmp_path: Path) -> None:
    written, folder = _write(tmp_path)
    for f in written.source_files:
        _edit(f, SpecificCharacterSet="ISO_IR 144", SeriesDescription="Грудь")
    with pytest.raises(_FallbackError, match="character set"):
        _fast_header(written.source_files[0])
    assert load_series(folder).series_description == "Грудь"


def test_fast_parser_agrees_with_pydicom_on_real_files(shared_data: Path) -> None:
    files = sorted((shared_data / "chest_ct_lidc").glob("*.dcm"))[::50]
    files += sorted((shared_data / EDGE / "duplicate_positions").glob("*.dcm"))[:3]
    files += sorted((shared_data / EDGE / "sliceincrement").rglob("*.dcm"))
    for f in files:
        _headers_agree(f)
    with pytest.raises(_FallbackError, match="transfer syntax"):  # JPEG 2000: pydicom
        _fast_header(next((shared_data / "thorax_ct_siemens_j2k").glob("CT.*")))


@pytest.mark.parametrize("signed", [0, 1])
def test_twelve_bit_pixels_match_pydicom(tmp_path: Path, signed: int) -> None:
    written, folder = _write(tmp_path)
    rng = np.random.default_rng(9)
    for f in written.source_files:
        ds = pydicom.dcmread(f)
        vals = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, size=(20, 18))
        raw = (vals & 0x0FFF) | (rng.integers(0, 16, size=vals.shape) << 12)  # junk high bits
        ds.PixelData = raw.astype("<u2").tobytes()
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
        ds.RescaleIntercept = "-1000"
        ds.save_as(f)
    vol = load_series(folder, check_hu=False)  # bit patterns, not a CT histogram
    for k in (0, 11, N - 1):
        ds = pydicom.dcmread(vol.source_files[k])
        # values <= -1500 HU are padding outside the scan: the loader keeps them as stored
        np.testing.assert_array_equal(vol.hu[k], ds.pixel_array.astype(np.float32) - 1000.0)
    assert vol.hu.min() < -2000 if signed else vol.hu.min() >= -1000
