"""The L3 body-composition SEG: valid for dcmtk and dicom3tools, round-trips, deterministic."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from core import __version__
from core.labels import COMPARTMENT_COLOURS, IMAT, SAT, SMA, VAT
from tests.conftest import require_program
from tests.support.outputs import (
    L3_INDEX,
    PATIENT,
    STUDY_UID,
    assert_l3spot_contributing_equipment,
    ct_dataset,
    synthetic_hu,
    synthetic_labels,
)
from worker.outputs.seg import SEG_SERIES_NUMBER, build_seg, compartment_tracking_uid
from worker.outputs.uids import derived_uid


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    build_seg(ct, labels).save_as(path, enforce_file_format=True)
    return path


def test_seg_passes_dciodvfy_without_errors_or_warnings(seg_file: Path) -> None:
    exe = require_program("dciodvfy")
    out = subprocess.run([exe, str(seg_file)], capture_output=True, text=True).stderr
    assert "Error" not in out, out
    assert "Warning" not in out, out


def test_seg_dcmdump_reads_without_errors(seg_file: Path) -> None:
    require_program("dcmdump")
    res = subprocess.run(["/usr/bin/dcmdump", str(seg_file)], capture_output=True, text=True)
    assert res.returncode == 0
    assert "E:" not in res.stderr and "W:" not in res.stderr, res.stderr


def test_segments_round_trip_with_codes_colours_and_masks(seg_file: Path) -> None:
    seg = hd.seg.segread(seg_file)
    labels = synthetic_labels()
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 4
    expected_type = {SMA: "127954009", IMAT: "55603005", VAT: "725274000", SAT: "67769002"}
    for number, code in expected_type.items():
        desc = seg.get_segment_description(number)
        assert desc.segmented_property_type.value == code
        assert desc.segmented_property_type.scheme_designator == "SCT"
        assert desc.segmented_property_category.value == "85756007"
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmName == "l3spot"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        back = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue)
        assert np.allclose(back.to_rgb(), COMPARTMENT_COLOURS[number], atol=3)
    ds = pydicom.dcmread(seg_file)
    arr = ds.pixel_array.reshape(4, *labels.shape)
    for frame, item in zip(arr, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert np.array_equal(frame.astype(bool), labels == number)


def test_seg_shares_study_patient_and_pixel_grid_of_the_source(seg_file: Path) -> None:
    ds = pydicom.dcmread(seg_file)
    src = ct_dataset(L3_INDEX, synthetic_hu(synthetic_labels()))
    assert ds.StudyInstanceUID == STUDY_UID
    assert ds.PatientName == PATIENT.name and ds.PatientID == PATIENT.patient_id
    assert ds.PatientBirthDate == PATIENT.birth_date and ds.PatientSex == PATIENT.sex
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns)
    sfg = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in sfg.PixelMeasuresSequence[0].PixelSpacing] == [4.0, 4.0]
    derivation = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    refs = derivation.SourceImageSequence
    assert refs[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert int(ds.SeriesNumber) == SEG_SERIES_NUMBER
    assert "SEG" in ds.SeriesDescription and "l3spot" in ds.SeriesDescription


def test_seg_uids_are_deterministic_and_depend_on_source_series_and_version() -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    a, b = build_seg(ct, labels), build_seg(ct, labels)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID == derived_uid(ct.SeriesInstanceUID, "seg-instance")
    assert derived_uid(ct.SeriesInstanceUID, "seg-instance", version="9.9") != a.SOPInstanceUID
    assert derived_uid("1.2.3", "seg-instance") != a.SOPInstanceUID
    assert len(str(a.SOPInstanceUID)) <= 64


def test_empty_compartment_keeps_its_segment() -> None:
    labels = synthetic_labels()
    labels[labels == IMAT] = SMA
    seg = build_seg(ct_dataset(L3_INDEX, synthetic_hu(labels)), labels)
    assert len(seg.SegmentSequence) == 4
    assert seg.get_segment_description(IMAT).segment_label == "Intermuscular adipose tissue"


def test_seg_refuses_a_label_map_off_the_source_grid_or_with_unknown_labels() -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    with pytest.raises(ValueError, match="pixel grid"):
        build_seg(ct, labels[:-1])
    bad = labels.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="outside 0..4"):
        build_seg(ct, bad)


def test_seg_meets_the_ihe_air_encoding_requirements(seg_file: Path) -> None:
    """IHE AI Results (AIR) for a SEG, one assertion per requirement (docs/outputs.md)."""
    ds = pydicom.dcmread(seg_file)
    src = ct_dataset(L3_INDEX, synthetic_hu(synthetic_labels()))
    # algorithm identity: General/Enhanced General Equipment and Contributing Equipment
    assert ds.Manufacturer == "l3spot"
    assert ds.ManufacturerModelName == "l3spot body composition"
    assert ds.SoftwareVersions == __version__ and ds.DeviceSerialNumber == "0"
    assert_l3spot_contributing_equipment(ds)
    # the result in the source study, derived series, dated content
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.Modality == "SEG"
    assert ds.ContentDate and ds.ContentTime
    assert ds.SeriesDescription == f"L3 body composition SEG (l3spot {__version__})"
    assert ds.ContentLabel == "L3_BODY_COMP" and ds.ContentDescription
    seg = hd.seg.segread(seg_file)
    for number in (SMA, IMAT, VAT, SAT):
        desc = seg.get_segment_description(number)
        # segment-level algorithm: type, name, TID 4019 identification with version
        assert desc.SegmentAlgorithmType == "AUTOMATIC"
        assert desc.SegmentAlgorithmName == "l3spot"
        algo = desc.algorithm_identification[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("l3spot", __version__)
        # tracking identifier and UID, the same UID as the SR's measurement group
        assert desc.tracking_id and desc.tracking_uid
        key = {SMA: "sma", IMAT: "imat", VAT: "vat", SAT: "sat"}[number]
        assert desc.tracking_uid == compartment_tracking_uid(src.SeriesInstanceUID, key)
        # coded meaning and a display colour
        assert desc.segmented_property_category and desc.segmented_property_type
        assert "RecommendedDisplayCIELabValue" in desc
    # the source image referenced per frame (Derivation Image / Source Image)
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
