"""Tests of worker.volume.orientation and the loader on every in-plane storage (#14, defect 1).

The same patient-space anatomy stored head-first prone (rotated 180 degrees), feet-first
supine (mirrored left-right) or decubitus (axes swapped) must give the same L3 and the same
areas as the head-first supine storage, and the SEG must lie on the stored pixel grid.
The stored series are built here by hand (explicit array operations and DICOM geometry), not
with the code under test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from core.config import Config
from core.errors import NonAxialError
from tests.support.orientation import STORAGES, stored_as
from worker import pipeline
from worker.volume.load import CTVolume, load_dicom_series, load_nifti
from worker.volume.orientation import InPlane, in_plane_from_orientation
from worker.volume.write import write_ct_series


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ((1, 0, 0, 0, 1, 0), InPlane()),
        ((-1, 0, 0, 0, -1, 0), InPlane(flip_rows=True, flip_cols=True)),
        ((-1, 0, 0, 0, 1, 0), InPlane(flip_cols=True)),
        ((1, 0, 0, 0, -1, 0), InPlane(flip_rows=True)),
        ((0, 1, 0, -1, 0, 0), InPlane(transpose=True, flip_cols=True)),
        ((0.999, 0.0436, 0, -0.0436, 0.999, 0), InPlane()),  # 2.5 degrees in plane
    ],
)
def test_in_plane_transform_of_each_storage(orientation, expected) -> None:
    assert in_plane_from_orientation(orientation) == expected


def test_transforms_are_inverse_views_and_a_sagittal_slice_is_refused() -> None:
    a = np.arange(12.0).reshape(3, 4)
    for t in (InPlane(), InPlane(True, True, False), InPlane(False, True, True), InPlane(True)):
        assert np.array_equal(t.to_source(t.to_canonical(a)), a)
        assert np.shares_memory(t.to_canonical(a), a)
    with pytest.raises(NonAxialError):
        in_plane_from_orientation((0, 1, 0, 0, 0, -1))  # sagittal


@pytest.mark.parametrize("storage", STORAGES[1:])
def test_loader_brings_every_storage_to_the_canonical_grid(tmp_path: Path, storage: str) -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-150, 150, size=(20, 12, 16)).astype(np.float32)  # soft tissue and fat
    hu[:, :2] = -1000.0  # air in front of the body
    canon = CTVolume(
        hu=hu,
        z_mm=np.arange(20) * 2.5,
        pixel_spacing_mm=(0.8, 0.7),
        image_position_first=(-100.0, -80.0, 0.0),
    )
    ref = write_ct_series(canon, tmp_path / "hfs", uid_seed="orient-hfs")
    stored, pp = stored_as(ref, storage)
    write_ct_series(
        dataclasses.replace(stored, sop_instance_uids=[], series_instance_uid=""),
        tmp_path / "s",
        uid_seed="orient-" + storage,
        patient_position=pp,
    )
    loaded = load_dicom_series(tmp_path / "s", min_slices=1)
    assert np.array_equal(loaded.hu, hu)
    assert loaded.pixel_spacing_mm == pytest.approx((0.8, 0.7))
    assert loaded.image_orientation == pytest.approx(ref.image_orientation, abs=1e-6)
    assert loaded.image_position_first == pytest.approx(ref.image_position_first, abs=1e-4)
    assert not loaded.in_plane.is_identity
    assert np.array_equal(loaded.in_plane.to_source(loaded.hu), stored.hu)


@pytest.mark.slow
def test_real_case_gives_the_same_l3_and_areas_in_every_storage(
    shared_data: Path, tmp_path: Path
) -> None:
    """Issue 14, defect 1: stored prone, the real case gave SMA 63 cm^2 instead of 139.5."""
    volume = load_nifti(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz")
    results, seg_masks = {}, {}
    for storage in STORAGES:
        stored, pp = stored_as(volume, storage)
        folder = tmp_path / storage
        write_ct_series(stored, folder, uid_seed="orient-real-" + storage, patient_position=pp)
        out = tmp_path / f"out-{storage}"
        results[storage] = pipeline.analyze_series(folder, out, Config())
        seg = pydicom.dcmread(out / "seg.dcm")
        loaded = load_dicom_series(folder)
        # the SEG's frames lie on the stored grid: back on the canonical grid they agree
        frames = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
        assert frames.shape[-2:] == (int(seg.Rows), int(seg.Columns))
        assert (int(seg.Rows), int(seg.Columns)) == stored.hu.shape[1:]
        seg_masks[storage] = np.ascontiguousarray(loaded.in_plane.to_canonical(frames))
    ref = results["HFS"]
    assert ref.l3.in_field_of_view and ref.composition is not None and ref.l3.slice_index == 74
    for storage in STORAGES[1:]:
        res = results[storage]
        assert res.l3.in_field_of_view, storage
        assert abs(res.l3.slice_index - ref.l3.slice_index) <= 1, storage
        if res.l3.slice_index == ref.l3.slice_index:
            assert np.array_equal(seg_masks[storage], seg_masks["HFS"]), storage
            # the picture is drawn on the canonical grid: anterior up, patient's right on
            # the left, whatever the storage (the R/L/A markers are right)
            hfs = np.asarray(Image.open(tmp_path / "out-HFS" / "overview.png"))
            picture = np.asarray(Image.open(tmp_path / f"out-{storage}" / "overview.png"))
            assert np.array_equal(picture, hfs), storage
        for key, comp in ref.composition.items():
            got = res.composition[key].area_cm2
            assert got == pytest.approx(comp.area_cm2, rel=0.01, abs=0.05), (storage, key)
        assert res.sarcopenia == ref.sarcopenia, storage
