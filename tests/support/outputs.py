"""Fabricated inputs for the DICOM output tests: a tiny CT series and analysis results.

Not a test module: imported by ``tests/test_dicom_out_*.py``. The CT datasets are written
with pydicom only (no project code), so the output layer is tested against an independent
source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from core import __version__
from core.labels import IMAT, SAT, SMA, VAT
from worker.composition.measure import CompositionResult, SarcopeniaResult, TissueMeasure
from worker.locator.locate import L3Location
from worker.mip import Mip
from worker.volume.load import CTVolume, PatientInfo

ROWS = COLS = 96
PIXEL_MM = 4.0
N_SLICES = 24
L3_INDEX = 12

STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10002"
FOR_UID = "1.2.826.0.1.3680043.8.498.10003"
PATIENT = PatientInfo(
    patient_id="PAT-0042", name="Doe^Jane", birth_date="19600101", sex="F", size_m=1.65
)


def synthetic_labels() -> np.ndarray:
    """(ROWS, COLS) uint8 label map: SAT ring, SMA ring with IMAT specks, VAT core."""
    yy, xx = np.mgrid[:ROWS, :COLS]
    r = np.hypot((yy - ROWS / 2) / 1.0, (xx - COLS / 2) / 1.2)
    lab = np.zeros((ROWS, COLS), np.uint8)
    lab[r < 44] = SAT
    lab[r < 36] = SMA
    lab[r < 28] = VAT
    lab[(r < 36) & (r >= 28) & ((yy + xx) % 11 == 0)] = IMAT
    lab[r < 12] = 0  # "bowel"
    return lab


def synthetic_hu(labels: np.ndarray) -> np.ndarray:
    """HU image matching ``labels``: muscle 45, fat -100, air -1000, bowel 20."""
    hu = np.full(labels.shape, -1000.0, np.float32)
    hu[labels == SAT] = -100
    hu[labels == VAT] = -95
    hu[labels == IMAT] = -70
    hu[labels == SMA] = 45
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    hu[np.hypot(yy - ROWS / 2, xx - COLS / 2) < 12] = 20
    return hu


def ct_dataset(index: int, hu: np.ndarray, patient: PatientInfo = PATIENT) -> Dataset:
    """One CT Image Storage dataset of the synthetic series (slice ``index``)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = f"{SERIES_UID}.{index + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN"
    ds.SeriesDescription = "Abdomen 4mm"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex or ""
    ds.PatientSize = patient.size_m
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = FOR_UID
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-COLS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, -200.0 + 5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = hu.shape[0]
    ds.Columns = hu.shape[1]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.AcquisitionNumber = 1
    ds.PixelData = np.clip(hu, -1024, 3071).astype(np.int16).tobytes()
    return ds


def write_series(out_dir: Path) -> list[Path]:
    """Write the synthetic series (N_SLICES files) into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hu = synthetic_hu(synthetic_labels())
    paths = []
    for i in range(N_SLICES):
        p = out_dir / f"ct_{i:03d}.dcm"
        ct_dataset(i, hu).save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def synthetic_volume(paths: list[Path]) -> CTVolume:
    """The CTVolume the loader would return for :func:`write_series` (built without it)."""
    hu = synthetic_hu(synthetic_labels())
    return CTVolume(
        hu=np.repeat(hu[None], N_SLICES, axis=0),
        z_mm=-200.0 + 5.0 * np.arange(N_SLICES),
        pixel_spacing_mm=(PIXEL_MM, PIXEL_MM),
        sop_instance_uids=[f"{SERIES_UID}.{i + 1}" for i in range(N_SLICES)],
        source_files=list(paths),
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        frame_of_reference_uid=FOR_UID,
        image_position_first=(-COLS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, -200.0),
        patient=PATIENT,
        series_description="Abdomen 4mm",
        study_date="20240102",
        slice_thickness_mm=5.0,
    )


def synthetic_mip(volume: CTVolume) -> Mip:
    """A plain frontal MIP of ``volume`` at 2 mm (no project code involved)."""
    proj = volume.hu.max(axis=1)[::-1]  # (z, x), head up
    return Mip(
        image=proj.astype(np.float32),
        pixel_mm=5.0,
        z_top_mm=float(volume.z_mm[-1]),
        slice_z_mm=np.asarray(volume.z_mm),
    )


def fabricated_location(in_fov: bool = True) -> L3Location:
    """An :class:`L3Location` at slice :data:`L3_INDEX`, or a not-in-FOV one."""
    rows = np.arange(0, 10, dtype=np.int64)
    preds = (8.0 - rows).astype(np.float32)
    if not in_fov:
        return L3Location(
            in_field_of_view=False,
            slice_index=None,
            z_mm=None,
            mip_row=None,
            confidence=0.12,
            reason="no window agrees on an L3 position (chest-only range)",
            window_top_rows=rows,
            predictions=preds,
            correlation=np.linspace(0.0, 0.1, 10).astype(np.float32),
            candidate_rows=np.arange(10, dtype=np.float64),
        )
    return L3Location(
        in_field_of_view=True,
        slice_index=L3_INDEX,
        z_mm=-200.0 + 5.0 * L3_INDEX,
        mip_row=float(N_SLICES - 1 - L3_INDEX),
        confidence=0.87,
        confidence_raw=0.61,
        confidence_calibrated=True,
        flag_below=0.5,
        window_top_rows=rows,
        predictions=preds,
        correlation=np.sin(np.linspace(0, 3, 10)).astype(np.float32),
        candidate_rows=np.arange(10, dtype=np.float64),
    )


def fabricated_composition(labels: np.ndarray | None = None) -> CompositionResult:
    """A :class:`CompositionResult` whose areas follow the synthetic label map."""
    labels = synthetic_labels() if labels is None else labels
    px_cm2 = PIXEL_MM * PIXEL_MM / 100.0
    hu = synthetic_hu(labels)
    measures = {}
    for lab, key in ((SMA, "sma"), (IMAT, "imat"), (VAT, "vat"), (SAT, "sat")):
        m = labels == lab
        measures[key] = TissueMeasure(
            area_cm2=float(m.sum() * px_cm2),
            mean_hu=float(hu[m].mean()) if m.any() else None,
            sd_hu=float(hu[m].std()) if m.any() else None,
            pixel_count=int(m.sum()),
        )
    smi = measures["sma"].area_cm2 / PATIENT.size_m**2  # type: ignore[operator]
    return CompositionResult(
        slice_index=L3_INDEX,
        labels=labels,
        measures=measures,
        smi_cm2_per_m2=smi,
        smi_reason=None,
        sarcopenia=SarcopeniaResult(
            cutoffs="prado2008", flag=smi < 38.5, threshold_cm2_per_m2=38.5
        ),
        bmi_kg_per_m2=None,
        qa_flags=["body_truncated"],
    )


def assert_l3spot_contributing_equipment(ds: Dataset) -> None:
    """IHE AIR 6.5.3.1: the algorithm in the Contributing Equipment Sequence (shared check)."""
    items = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "l3spot"]
    assert len(items) == 1, ds.ContributingEquipmentSequence
    (item,) = items
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert item.ManufacturerModelName == "l3spot body composition"
    assert item.SoftwareVersions == __version__
    assert item.DeviceSerialNumber == "0"
    assert "DeviceUID" not in item  # unknown there to dciodvfy; see worker/outputs/equipment.py
    assert item.ContributionDateTime  # when the analysis ran
    assert f"l3spot {__version__}" in item.ContributionDescription
    # the source's acquisition equipment stays listed (highdicom adds it)
    purposes = {
        i.PurposeOfReferenceCodeSequence[0].CodeValue for i in ds.ContributingEquipmentSequence
    }
    assert "109101" in purposes
