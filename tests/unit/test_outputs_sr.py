"""The TID 1500 SR: valid for dcmtk and dicom3tools, parsable by highdicom, says what it must."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from core import __version__
from tests.conftest import require_program
from tests.support.outputs import (
    L3_INDEX,
    PATIENT,
    STUDY_UID,
    assert_l3spot_contributing_equipment,
    ct_dataset,
    fabricated_composition,
    fabricated_location,
    synthetic_hu,
    synthetic_labels,
)
from worker.outputs.seg import build_seg, compartment_tracking_uid
from worker.outputs.sr import (
    NOT_IN_FOV_TEXT,
    approximate_polygon,
    build_not_measured_sr,
    build_sr,
    region_polygon,
    report_evaluations,
)
from worker.outputs.uids import device_observer_uid

#: dciodvfy warnings accepted, with the reason (docs/outputs.md):
#: l3spot's private coding scheme "99L3SPOT" (PS3.16 section 8) is declared in the Coding
#: Scheme Identification Sequence but is not a DICOM defined term.
ACCEPTED_WARNINGS = ("Unrecognized defined term <99L3SPOT>",)
#: QA flags the in-field-of-view report carries (so that every SR test sees them too)
QA = ("body_truncated", "low_l3_confidence")


def _write(tmp: Path, in_fov: bool) -> tuple[Path, Path | None]:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    if not in_fov:
        sr = build_sr(ct, fabricated_location(False), None, None, QA)
        sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
        return tmp / "sr.dcm", None
    seg = build_seg(ct, labels)
    seg.save_as(tmp / "seg.dcm", enforce_file_format=True)
    sr = build_sr(ct, fabricated_location(), fabricated_composition(labels), seg, QA)
    sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
    return tmp / "sr.dcm", tmp / "seg.dcm"


@pytest.fixture(scope="module")
def sr_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    sr, seg = _write(tmp_path_factory.mktemp("sr"), True)
    assert seg is not None
    return sr, seg


@pytest.fixture(scope="module")
def sr_no_fov(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("srnofov"), False)[0]


def _dciodvfy_problems(path: Path) -> tuple[list[str], list[str]]:
    exe = require_program("dciodvfy")
    lines = subprocess.run([exe, str(path)], capture_output=True, text=True).stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, [w for w in warnings if not any(a in w for a in ACCEPTED_WARNINGS)]


@pytest.mark.parametrize("which", ["in_fov", "not_in_fov"])
def test_sr_passes_dciodvfy_with_only_the_accepted_warnings(
    which: str, sr_files: tuple[Path, Path], sr_no_fov: Path
) -> None:
    path = sr_files[0] if which == "in_fov" else sr_no_fov
    errors, warnings = _dciodvfy_problems(path)
    assert errors == [] and warnings == [], errors + warnings


def test_dsrdump_reads_the_tree_without_complaint(sr_files: tuple[Path, Path]) -> None:
    require_program("dsrdump")
    res = subprocess.run(["/usr/bin/dsrdump", str(sr_files[0])], capture_output=True, text=True)
    assert res.returncode == 0
    assert not [ln for ln in res.stderr.splitlines() if ln[:2] in ("E:", "W:")], res.stderr
    assert '"Imaging Measurement Report"' in res.stdout
    assert '(36470004,SCT,"L3 vertebra")' in res.stdout
    assert res.stdout.count("Referenced Segmentation Frame") == 4
    res2 = subprocess.run(["/usr/bin/dcmdump", str(sr_files[0])], capture_output=True, text=True)
    assert res2.returncode == 0 and "E:" not in res2.stderr


def test_measurements_round_trip_through_highdicom(sr_files: tuple[Path, Path]) -> None:
    sr_path, seg_path = sr_files
    report = hd.sr.srread(sr_path)
    seg = pydicom.dcmread(seg_path)
    comp = fabricated_composition()
    groups = report.content.get_planar_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert set(by_id) == {
        f"L3 localisation: image {L3_INDEX + 1}",
        "L3 Skeletal muscle",
        "L3 Intermuscular adipose tissue",
        "L3 Visceral adipose tissue",
        "L3 Subcutaneous adipose tissue",
    }
    for number, key, name in [
        (1, "sma", "Skeletal muscle"),
        (2, "imat", "Intermuscular adipose tissue"),
        (3, "vat", "Visceral adipose tissue"),
        (4, "sat", "Subcutaneous adipose tissue"),
    ]:
        g = by_id[f"L3 {name}"]
        src_series = ct_dataset(L3_INDEX, np.zeros((2, 2))).SeriesInstanceUID
        assert g.tracking_uid == compartment_tracking_uid(src_series, key)
        values = {m.name.value: (m.value, m.unit.value) for m in g.get_measurements()}
        # rounded to what is measured (issue 14, defect 6): 0.1 cm2, 0.1 HU
        assert values["42798000"] == (round(comp.measures[key].area_cm2, 1), "cm2")
        assert values["112181"] == (round(comp.measures[key].mean_hu, 1), "[hnsf'U]")
        assert g.finding_sites[0].value.CodeValue == "36470004"
        ref = g.referenced_segmentation_frame
        seg_item = ref[0].ReferencedSOPSequence[0]
        assert seg_item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(seg_item.ReferencedSegmentNumber) == number
        assert "ReferencedFrameNumber" not in seg_item
        src_item = ref[1].ReferencedSOPSequence[0]
        assert (
            src_item.ReferencedSOPInstanceUID
            == ct_dataset(L3_INDEX, np.zeros((2, 2))).SOPInstanceUID
        )
        assert "ReferencedFrameNumber" not in src_item
        assert g.roi is not None and g.roi.GraphicType == "POLYLINE"
    sma = by_id["L3 Skeletal muscle"]
    smi = [m for m in sma.get_measurements() if m.name.value == "SMI"]
    assert smi and smi[0].value == round(comp.smi_cm2_per_m2, 2)
    evals = sma.get_qualitative_evaluations()
    assert [(e.name.value, e.value.value) for e in evals] == [("SARCO", "373067005")]


def test_tracking_uids_are_shared_with_the_seg_segments(sr_files: tuple[Path, Path]) -> None:
    report = hd.sr.srread(sr_files[0])
    seg = hd.seg.segread(sr_files[1])
    seg_uids = {seg.get_segment_description(n).tracking_uid for n in (1, 2, 3, 4)}
    sr_uids = {g.tracking_uid for g in report.content.get_planar_roi_measurement_groups()}
    assert seg_uids <= sr_uids
    assert len(sr_uids) == 5


def test_localisation_group_carries_slice_position_confidence_and_region(
    sr_files: tuple[Path, Path],
) -> None:
    report = hd.sr.srread(sr_files[0])
    loc = fabricated_location()
    g = report.content.get_planar_roi_measurement_groups()[0]
    # the L3 image as the viewer names it (issue 14, defect 5): its Instance Number and its
    # own position (Image Position z here: no Slice Location), confidence to 0.01
    l3_image = ct_dataset(L3_INDEX, np.zeros((2, 2)))
    assert g.tracking_identifier == f"L3 localisation: image {l3_image.InstanceNumber}"
    values = {m.name.value: m.value for m in g.get_measurements()}
    assert values["L3Z"] == pytest.approx(float(l3_image.ImagePositionPatient[2]))
    assert values["L3CONF"] == round(loc.confidence, 2)
    assert g.roi.GraphicType == "POINT"
    assert (
        g.roi.ContentSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID.endswith(f".{L3_INDEX + 1}")
    )


def test_sr_is_in_the_source_study_with_the_source_patient(sr_files: tuple[Path, Path]) -> None:
    ds = pydicom.dcmread(sr_files[0])
    assert ds.StudyInstanceUID == STUDY_UID
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        PATIENT.name,
        PATIENT.patient_id,
        PATIENT.birth_date,
        PATIENT.sex,
    )
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert "report" in ds.SeriesDescription and "l3spot" in ds.SeriesDescription
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert pydicom.dcmread(sr_files[1]).SOPInstanceUID in evidence


def test_not_in_fov_report_says_so_why_and_has_no_measurement_group(sr_no_fov: Path) -> None:
    """Issue 18: the report says "not measured, L3 not in field of view", why, and the QA
    flags, in TID 1500's report-level Qualitative Evaluations; no measurement group."""
    from core.qa import QA_FLAGS

    ds = pydicom.dcmread(sr_no_fov)
    report = hd.sr.srread(sr_no_fov)
    assert report.content.get_image_measurement_groups() == []
    assert report.content.get_planar_roi_measurement_groups() == []
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (ds.ConceptNameCodeSequence[0].CodeValue, ds.ContinuityOfContent) == (
        "L3NMREPORT",
        "SEPARATE",
    )
    no = "373067005"  # SCT "No"
    reason = (
        f"{NOT_IN_FOV_TEXT}: {fabricated_location(False).reason} (localisation confidence 0.12)"
    )
    assert report_evaluations(ds) == [
        ("L3MEAS", no),
        ("L3FOV", no),
        ("L3NMREASON", reason),
        *(("QAFLAG", QA_FLAGS[f].code) for f in QA),
    ]
    res = subprocess.run(["/usr/bin/dsrdump", str(sr_no_fov)], capture_output=True, text=True)
    assert res.returncode == 0
    assert not [ln for ln in res.stderr.splitlines() if ln[:2] in ("E:", "W:")], res.stderr
    assert '"L3 body composition not measured"' in res.stdout
    assert '"Qualitative Evaluations")=SEPARATE' in res.stdout
    assert "L3 not in field of view" in res.stdout


def _groups(sequence: Sequence[Dataset]) -> list[Dataset]:
    """Every Measurement Group container (DCM 125007) in an SR content tree."""
    out = []
    for item in sequence:
        if item.ValueType == "CONTAINER":
            if item.ConceptNameCodeSequence[0].CodeValue == "125007":
                out.append(item)
            out.extend(_groups(item.get("ContentSequence", [])))
    return out


@pytest.mark.parametrize("which", ["in_fov", "not_in_fov", "not_measured"])
def test_every_report_opens_in_ohif_by_construction(
    which: str, sr_files: tuple[Path, Path], sr_no_fov: Path
) -> None:
    """Issue 18, what OHIF 3.13.2 needs of a report (its SR viewport throws otherwise;
    tests/integration/test_ohif.py opens each one): every measurement group has an image
    region (SCOORD), and a DCM 126000 "Imaging Measurement Report" has at least one group
    (OHIF shows a report of any other title as text)."""
    if which == "not_measured":
        ds = build_not_measured_sr(ct_dataset(L3_INDEX, np.zeros((2, 2))), "refused")
    else:
        ds = pydicom.dcmread(sr_files[0] if which == "in_fov" else sr_no_fov)
    groups = _groups(ds.ContentSequence)
    for g in groups:
        assert any(it.ValueType == "SCOORD" for it in g.ContentSequence), g
    if ds.ConceptNameCodeSequence[0].CodeValue == "126000":
        assert groups
    else:
        assert not groups and report_evaluations(ds)[0] == ("L3MEAS", "373067005")


def test_not_in_fov_report_refuses_a_composition() -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    seg = build_seg(ct, labels)
    with pytest.raises(ValueError, match="not in the field of view"):
        build_sr(ct, fabricated_location(False), fabricated_composition(labels), seg)


def test_sr_uids_are_deterministic(tmp_path: Path) -> None:
    a = pydicom.dcmread(_write(tmp_path, True)[0])
    (tmp_path / "b").mkdir()
    b = pydicom.dcmread(_write(tmp_path / "b", True)[0])
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)


def test_region_polygon_is_closed_and_outlines_the_largest_part() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:8, 3:9] = True  # 6 x 6 square
    mask[15, 15] = True  # a stray pixel, smaller
    poly = region_polygon(mask)
    assert poly is not None
    assert np.array_equal(poly[0], poly[-1])
    assert poly[:, 0].min() == pytest.approx(3.0) and poly[:, 0].max() == pytest.approx(9.0)
    assert poly[:, 1].min() == pytest.approx(2.0) and poly[:, 1].max() == pytest.approx(8.0)
    assert region_polygon(np.zeros((4, 4), bool)) is None


def _region_polygon_on_the_whole_image(mask: np.ndarray) -> np.ndarray | None:
    """The outline computed on the whole image with scikit-image (before the bounding box)."""
    from scipy import ndimage
    from skimage import measure

    if not mask.any():
        return None
    comp, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
        mask = comp == (int(np.argmax(sizes)) + 1)
    filled = ndimage.binary_fill_holes(mask)
    contours = measure.find_contours(np.pad(filled, 1).astype(np.float32), 0.5)
    contour = measure.approximate_polygon(max(contours, key=len), tolerance=0.75)
    if len(contour) < 4:
        r, col = np.argwhere(filled)[0]
        square = [(col, r), (col + 1, r), (col + 1, r + 1), (col, r + 1), (col, r)]
        return np.asarray(square, dtype=np.float32)
    pts = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1).astype(np.float32)
    pts[-1] = pts[0]
    return pts


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_region_polygon_on_the_bounding_box_equals_the_whole_image_computation() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(7)
    masks = [synthetic_labels() == lab for lab in (1, 2, 3, 4)]
    for i in range(240):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        if i % 3 == 0:  # speckle, touching the edges
            masks.append(rng.random(shape) < rng.random())
        elif i % 3 == 1:  # blobs with holes
            masks.append(ndimage.binary_opening(rng.random(shape) < 0.6))
        else:  # one pixel
            m = np.zeros(shape, bool)
            m[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
            masks.append(m)
    for mask in masks:
        expected = _region_polygon_on_the_whole_image(mask)
        got = region_polygon(mask)
        if expected is None:
            assert got is None
            continue
        assert got is not None and got.dtype == expected.dtype
        assert np.array_equal(got, expected)  # bit for bit: the SR content must not change


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_approximate_polygon_matches_scikit_image_bit_for_bit() -> None:
    from skimage.measure import approximate_polygon as skimage_approximate_polygon

    rng = np.random.default_rng(3)
    for _ in range(200):
        chain = rng.normal(size=(int(rng.integers(2, 200)), 2)).cumsum(axis=0)
        for tolerance in (0.0, 0.5, 0.75, 3.0):
            expected = skimage_approximate_polygon(chain, tolerance)
            assert np.array_equal(approximate_polygon(chain, tolerance), expected)


def test_sr_requires_seg_and_composition_together() -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    with pytest.raises(ValueError, match="together"):
        build_sr(ct, fabricated_location(), fabricated_composition(labels), None)


def test_qa_flags_are_qualitative_evaluations_with_their_meaning(
    sr_files: tuple[Path, Path],
) -> None:
    """Issue 14, defect 6: the QA flags reach the PACS in the SR, coded, with their meaning."""
    from core.qa import QA_FLAGS

    report = hd.sr.srread(sr_files[0])
    g = report.content.get_planar_roi_measurement_groups()[0]
    flags = [
        (e.value.value, e.value.meaning, e.value.scheme_designator)
        for e in g.get_qualitative_evaluations()
        if e.name.value == "QAFLAG"
    ]
    assert flags == [(QA_FLAGS[f].code, QA_FLAGS[f].meaning, "99L3SPOT") for f in QA]


def test_every_group_has_an_image_region_even_an_empty_compartment(tmp_path: Path) -> None:
    # issue 18: OHIF 3.13.2 stops the whole viewer ("Something went wrong", TypeError reading
    # ReferencedSOPSequence of coords[0]) on a measurement group without an image region, so
    # an empty compartment keeps its POINT (OHIF shows it as "Area: cm2", printing no 0)
    labels = synthetic_labels()
    labels[labels == 2] = 3  # IMAT (label 2) empty: its pixels become VAT
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    seg = build_seg(ct, labels)
    sr = build_sr(ct, fabricated_location(), fabricated_composition(labels), seg, QA)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path)
    groups = {g.tracking_identifier: g for g in report.content.get_planar_roi_measurement_groups()}
    assert len(groups) == 5 and report.content.get_image_measurement_groups() == []
    assert all(g.roi is not None for g in groups.values())
    imat = groups["L3 Intermuscular adipose tissue"]
    assert imat.roi.GraphicType == "POINT"
    assert imat.referenced_segmentation_frame is not None
    assert {m.name.meaning: m.value for m in imat.get_measurements()}["Area"] == 0.0
    for name in ("L3 Skeletal muscle", "L3 Visceral adipose tissue"):
        assert groups[name].roi.GraphicType == "POLYLINE"


def test_sr_meets_the_ihe_air_encoding_requirements(sr_files: tuple[Path, Path]) -> None:
    """IHE AI Results (AIR) for a TID 1500 SR, one assertion per requirement (docs/outputs.md)."""
    ds = pydicom.dcmread(sr_files[0])
    src = ct_dataset(L3_INDEX, np.zeros((2, 2)))
    # algorithm identity: General Equipment and Contributing Equipment (same as the SEG's)
    assert ds.Manufacturer == "l3spot"
    assert ds.ManufacturerModelName == "l3spot body composition"
    assert ds.SoftwareVersions == __version__ and ds.DeviceSerialNumber == "0"
    assert_l3spot_contributing_equipment(ds)
    # the result in the source study, dated content, the series description convention
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.Modality == "SR"
    assert ds.ContentDate and ds.ContentTime
    assert ds.SeriesDescription == f"L3 body composition report (l3spot {__version__})"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # TID 1500 root
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = hd.sr.srread(sr_files[0])
    # observer context: the device (TID 1002 / TID 1004), UID of this version
    obs = {
        it.ConceptNameCodeSequence[0].CodeValue: it
        for it in ds.ContentSequence
        if it.RelationshipType == "HAS OBS CONTEXT"
    }
    assert obs["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type = Device
    assert device_observer_uid() == obs["121012"].UID
    assert obs["121013"].TextValue == "l3spot"
    assert obs["121014"].TextValue == "l3spot"
    assert obs["121015"].TextValue == "l3spot body composition"
    # every measurement group: tracking identifier + UID, finding, finding site, TID 4019
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 5
    for g in groups:
        assert g.tracking_identifier and g.tracking_uid
        assert g.finding_type is not None and g.finding_sites
        algo = {
            it.ConceptNameCodeSequence[0].CodeValue: it.TextValue
            for it in g[0].ContentSequence
            if it.ValueType == "TEXT"
        }
        assert algo["111001"] == "l3spot" and algo["111003"] == __version__
        # each measurement with UCUM units
        for m in g.get_measurements():
            assert m.unit.scheme_designator == "UCUM"
    # the images the results are about: Image Library and the evidence
    assert pydicom.dcmread(sr_files[1]).SOPInstanceUID in {
        r.ReferencedSOPInstanceUID
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }


def _with_trabecular(labels: np.ndarray):  # noqa: ANN202
    """The fabricated composition with an L3 trabecular measurement (an ellipse ROI)."""
    import dataclasses

    from worker.composition.bone import TrabecularAttenuation

    yy, xx = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]]
    cy, cx = labels.shape[0] * 0.6, labels.shape[1] / 2
    roi = ((yy - cy) / 8.0) ** 2 + ((xx - cx) / 12.0) ** 2 <= 1.0
    trab = TrabecularAttenuation(
        mean_hu=187.34, sd_hu=41.26, roi_area_cm2=3.14, pixel_count=900, slices=[4, 5], roi=roi
    )
    return dataclasses.replace(fabricated_composition(labels), trabecular=trab)


def test_trabecular_attenuation_is_its_own_group_and_dciodvfy_stays_clean(
    tmp_path: Path,
) -> None:
    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    seg = build_seg(ct, labels)
    sr = build_sr(ct, fabricated_location(), _with_trabecular(labels), seg, QA)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = _dciodvfy_problems(path)
    assert errors == [] and warnings == [], errors + warnings
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    g = by_id["L3 vertebral body trabecular bone"]
    assert (g.finding_type.value, g.finding_type.scheme_designator) == ("3138006", "SCT")
    assert g.finding_sites[0].value.CodeValue == "36470004"
    assert g.roi is not None and g.roi.GraphicType == "POLYLINE"
    values = {
        (m.name.value, m.derivation.value if m.derivation else None): (m.value, m.unit.value)
        for m in g.get_measurements()
    }
    assert values[("112181", None)] == (187.3, "[hnsf'U]")
    assert values[("112031", "386136009")] == (41.3, "[hnsf'U]")
    assert values[("42798000", None)] == (3.1, "cm2")


def test_refused_trabecular_attenuation_adds_no_group(tmp_path: Path) -> None:
    import dataclasses

    from worker.composition.bone import TrabecularAttenuation

    labels = synthetic_labels()
    ct = ct_dataset(L3_INDEX, synthetic_hu(labels))
    comp = dataclasses.replace(
        fabricated_composition(labels),
        trabecular=TrabecularAttenuation(None, reason="no vertebral body found"),
    )
    sr = build_sr(ct, fabricated_location(), comp, build_seg(ct, labels), QA)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = hd.sr.srread(tmp_path / "sr.dcm")
    ids = [g.tracking_identifier for g in report.content.get_planar_roi_measurement_groups()]
    assert "L3 vertebral body trabecular bone" not in ids and len(ids) == 5
