"""Training samples from a site's DICOM SEG (``l3spot train-seg --site-csv`` with a SEG).

The SEG is the one l3spot itself writes (:func:`worker.outputs.seg.build_seg`) on the L3
image of a small phantom CT series; read back, its masks must equal the phantom's labels.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from core.labels import IMAT, SAT, SMA, VAT
from worker.outputs.seg import build_seg
from worker.phantom import PhantomSpec, generate_phantom
from worker.training.segmentation import SegInputError, seg_training_slices, site_slices
from worker.volume.load import CTVolume, load_series
from worker.volume.write import write_ct_series


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTVolume, np.ndarray, int]:
    spec = PhantomSpec(
        fov="abdomen", slice_thickness_mm=5.0, rows=128, cols=128, pixel_spacing_mm=3.0
    )
    ph = generate_phantom(3, spec)
    out = tmp_path_factory.mktemp("ct")
    write_ct_series(ph.volume, out, uid_seed="train-seg-dicom")
    vol = load_series(out)
    return vol, ph.labels, int(ph.truth.l3_mid_slice_index)


def _write_seg(vol: CTVolume, labels_2d: np.ndarray, k: int, path: Path) -> Path:
    import pydicom

    ct = pydicom.dcmread(vol.source_files[k], stop_before_pixels=True)
    build_seg(ct, labels_2d).save_as(path, enforce_file_format=True)
    return path


def test_seg_written_by_l3spot_reads_back_as_the_same_masks(phantom_series, tmp_path):
    vol, labels, k = phantom_series
    truth = labels[k].astype(np.uint8)
    assert all((truth == v).any() for v in (SMA, IMAT, VAT, SAT))
    seg = _write_seg(vol, truth, k, tmp_path / "seg.dcm")
    got = seg_training_slices(seg, vol)
    assert len(got) == 1
    s = got[0]
    assert s.labels.dtype == np.uint8 and s.labels.shape == truth.shape
    np.testing.assert_array_equal(s.labels, truth)
    np.testing.assert_array_equal(s.hu, vol.hu[k])
    assert s.spacing_mm == pytest.approx(vol.pixel_spacing_mm)


def test_site_csv_accepts_a_seg_beside_its_dicom_series(phantom_series, tmp_path):
    vol, labels, k = phantom_series
    seg = _write_seg(vol, labels[k].astype(np.uint8), k, tmp_path / "l3.dcm")
    csv_path = tmp_path / "site.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ct", "labels"])
        w.writerow([str(vol.source_files[0].parent), seg.name])  # labels relative to the CSV
    got = site_slices(csv_path)
    assert [s.name for s in got] == [f"l3.dcm_z{k}"]
    np.testing.assert_array_equal(got[0].labels, labels[k])


def test_seg_of_another_series_is_refused_with_its_uid(phantom_series, tmp_path):
    vol, labels, k = phantom_series
    seg_path = _write_seg(vol, labels[k].astype(np.uint8), k, tmp_path / "seg.dcm")
    other = CTVolume(
        hu=vol.hu,
        z_mm=vol.z_mm,
        pixel_spacing_mm=vol.pixel_spacing_mm,
        sop_instance_uids=vol.sop_instance_uids,
        series_instance_uid=generate_uid(),
    )
    import pydicom

    sop = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
    with pytest.raises(SegInputError, match="references series") as err:
        seg_training_slices(seg_path, other)
    assert err.value.sop_instance_uid == sop and sop in str(err.value)
    assert isinstance(err.value, ValueError)


def test_seg_without_a_known_segment_is_refused(phantom_series, tmp_path):
    import pydicom

    vol, labels, k = phantom_series
    seg_path = _write_seg(vol, labels[k].astype(np.uint8), k, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(seg_path)
    for item in ds.SegmentSequence:  # recode every segment as "Liver", an unknown tissue
        item.SegmentLabel = "Liver"
        item.SegmentedPropertyTypeCodeSequence[0].CodeValue = "10200004"
        item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Liver"
        if "AnatomicRegionSequence" in item:
            del item.AnatomicRegionSequence
    ds.save_as(seg_path)
    with pytest.raises(SegInputError, match="no SMA/IMAT/VAT/SAT segment") as err:
        seg_training_slices(seg_path, vol)
    assert str(ds.SOPInstanceUID) in str(err.value)


def test_segments_are_matched_by_label_when_codes_are_unknown(phantom_series, tmp_path):
    import pydicom

    vol, labels, k = phantom_series
    seg_path = _write_seg(vol, labels[k].astype(np.uint8), k, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(seg_path)
    names = {SMA: "SMA", IMAT: "IMAT", VAT: "visceral_fat", SAT: "Subcutaneous fat"}
    for item in ds.SegmentSequence:
        item.SegmentLabel = names[int(item.SegmentNumber)]
        item.SegmentedPropertyTypeCodeSequence[0].CodeValue = "85756007"  # "Tissue"
        if "AnatomicRegionSequence" in item:
            del item.AnatomicRegionSequence
    ds.save_as(seg_path)
    got = seg_training_slices(seg_path, vol)
    np.testing.assert_array_equal(got[0].labels, labels[k])


def test_train_seg_cli_trains_from_a_seg_only_site_csv(phantom_series, tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from l3spot import app

    torch.set_num_threads(1)
    vol, labels, k = phantom_series
    seg = _write_seg(vol, labels[k].astype(np.uint8), k, tmp_path / "l3.dcm")
    csv_path = tmp_path / "site.csv"
    csv_path.write_text(f"ct,labels\n{vol.source_files[0].parent},{seg.name}\n")
    out = tmp_path / "w.pt"
    args = ["train-seg", "--out", str(out), "--phantoms", "0", "--site-csv", str(csv_path)]
    res = CliRunner().invoke(app, [*args, "--steps", "2", "--batch", "1", "--crop", "64"])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["data"]["n_slices"] == 1 and rec["steps_done"] == 2
    assert out.is_file()


def test_site_csv_accepts_a_nifti_ct_and_label_map(phantom_series, tmp_path):
    """NIfTI CT + label map rows are read by the worker itself (no :mod:`research` import)."""
    import nibabel as nib

    vol, labels, k = phantom_series
    sy, sx = vol.pixel_spacing_mm
    dz = float(np.median(np.diff(vol.z_mm)))
    affine = np.diag([sx, sy, dz, 1.0])  # voxel (x, y, z); values as stored
    ct = np.ascontiguousarray(np.transpose(vol.hu.astype(np.int16), (2, 1, 0)))
    lab = np.zeros_like(ct, dtype=np.uint8)
    lab[:, :, k] = labels[k].astype(np.uint8).T
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "lab.nii.gz")
    csv_path = tmp_path / "site.csv"
    csv_path.write_text("ct,labels\nct.nii.gz,lab.nii.gz\n")
    got = site_slices(csv_path)
    assert len(got) == 1
    s = got[0]
    assert s.name == f"ct.nii.gz_z{k}", s.name
    assert s.hu.shape == s.labels.shape == labels[k].shape
    assert {int(v) for v in np.unique(s.labels)} == {
        int(v) for v in np.unique(labels[k].astype(np.uint8))
    }
    assert int((s.labels > 0).sum()) == int((labels[k] > 0).sum())
