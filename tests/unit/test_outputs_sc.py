"""The Secondary Capture and the pictures: valid DICOM, readable size, right content."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.labels import COMPARTMENT_COLOURS, SMA
from tests.conftest import require_program
from tests.support.outputs import (
    L3_INDEX,
    PATIENT,
    STUDY_UID,
    ct_dataset,
    fabricated_composition,
    fabricated_location,
    synthetic_hu,
    synthetic_labels,
    synthetic_volume,
)
from worker.mip import Mip
from worker.outputs.render import (
    ACCENT,
    HEIGHT,
    _mip_panel,
    overlay_labels,
    render_overview,
    render_summary,
)
from worker.outputs.sc import SC_SERIES_NUMBER, build_sc


def _mip(rows: int = 120, cols: int = 100) -> Mip:
    img = np.full((rows, cols), -1000.0, np.float32)
    img[:, 40:60] = 700.0  # a "spine"
    return Mip(image=img, pixel_mm=2.0, z_top_mm=0.0, slice_z_mm=np.linspace(-238, 0, 120))


@pytest.fixture(scope="module")
def summary() -> np.ndarray:
    labels = synthetic_labels()
    loc = fabricated_location()
    loc.mip_row = 60.0
    return render_summary(
        synthetic_hu(labels), (4.0, 4.0), _mip(), loc, fabricated_composition(labels), ["x"]
    )


def test_summary_is_large_enough_for_a_reading_room_monitor(summary: np.ndarray) -> None:
    assert summary.dtype == np.uint8 and summary.ndim == 3 and summary.shape[2] == 3
    assert summary.shape[0] >= 1024 and summary.shape[0] == HEIGHT
    assert summary.shape[1] >= 1024 + 700


def test_summary_shows_coloured_masks_and_the_l3_line(summary: np.ndarray) -> None:
    left = summary[:, :HEIGHT]
    # SMA blended colour is present in the slice panel
    blended = overlay_labels(np.full((1, 1), 45.0), np.full((1, 1), SMA, np.uint8))[0, 0]
    assert np.any(np.all(np.abs(left.astype(int) - blended.astype(int)) <= 2, axis=2))
    # the L3 line: a full row of the accent colour in the MIP panel, at MIP row 60 of 120
    mip_panel = summary[:, HEIGHT : HEIGHT + 640]
    accent_rows = np.where(np.all(mip_panel == ACCENT, axis=2).mean(axis=1) > 0.9)[0]
    assert accent_rows.size > 0
    assert abs(accent_rows.mean() - HEIGHT / 2) < 0.05 * HEIGHT


def test_overlay_leaves_background_grey_and_tints_labels() -> None:
    hu = np.zeros((2, 2), np.float32)
    lab = np.array([[0, SMA], [0, 0]], np.uint8)
    rgb = overlay_labels(hu, lab)
    assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]
    assert rgb[0, 1, 0] > rgb[0, 1, 1]  # red tint for SMA (220, 50, 47)
    assert COMPARTMENT_COLOURS[SMA][0] > COMPARTMENT_COLOURS[SMA][1]


def test_not_in_fov_picture_has_no_mask_colours() -> None:
    img = render_summary(None, (1.0, 1.0), _mip(), fabricated_location(False), None, [])
    left = img[:, :HEIGHT].astype(int)
    for colour in COMPARTMENT_COLOURS.values():
        assert not np.any(np.all(np.abs(left - np.asarray(colour)) <= 1, axis=2))
    assert np.any(np.all(img == ACCENT, axis=2))  # the "L3 not in field of view" text


def test_not_in_fov_picture_shows_the_mip_once(summary: np.ndarray) -> None:
    img = render_summary(None, (1.0, 1.0), _mip(), fabricated_location(False), None, [])
    # the large left MIP + the text panel: the in-FOV layout minus its small MIP panel
    # (before, the same MIP was drawn twice and both pictures had the same width)
    mip_panel_width = _mip_panel(_mip(), fabricated_location())[0].width
    assert img.shape[1] == summary.shape[1] - mip_panel_width


def test_overview_adds_the_locator_curves(summary: np.ndarray) -> None:
    ov = render_overview(summary, _mip(), fabricated_location())
    assert ov.shape[1] == summary.shape[1] and ov.shape[0] > summary.shape[0]
    assert np.array_equal(ov[: summary.shape[0]], summary)
    curves = ov[summary.shape[0] :]
    assert np.any(np.all(curves == (255, 193, 7), axis=2))  # correlation line drawn


@pytest.fixture(scope="module")
def sc_file(summary: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ct = ct_dataset(L3_INDEX, synthetic_hu(synthetic_labels()))
    path = tmp_path_factory.mktemp("sc") / "sc.dcm"
    build_sc(ct, summary).save_as(path, enforce_file_format=True)
    return path


def test_sc_passes_dciodvfy_and_dcmdump(sc_file: Path) -> None:
    exe = require_program("dciodvfy")
    out = subprocess.run([exe, str(sc_file)], capture_output=True, text=True).stderr
    assert "Error" not in out and "Warning" not in out, out
    res = subprocess.run(["/usr/bin/dcmdump", str(sc_file)], capture_output=True, text=True)
    assert res.returncode == 0 and "E:" not in res.stderr


def test_sc_holds_the_picture_in_the_source_study(sc_file: Path, summary: np.ndarray) -> None:
    ds = pydicom.dcmread(sc_file)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
    assert np.array_equal(ds.pixel_array, summary)
    assert ds.StudyInstanceUID == STUDY_UID and ds.PatientID == PATIENT.patient_id
    assert ds.PatientName == PATIENT.name and ds.PatientBirthDate == PATIENT.birth_date
    assert int(ds.SeriesNumber) == SC_SERIES_NUMBER
    assert "l3spot" in ds.SeriesDescription


def test_sc_refuses_non_rgb_pixels() -> None:
    ct = ct_dataset(L3_INDEX, synthetic_hu(synthetic_labels()))
    with pytest.raises(ValueError, match="uint8"):
        build_sc(ct, np.zeros((10, 10), np.uint8))


def test_synthetic_volume_matches_the_written_series(tmp_path: Path) -> None:
    # guards the fixture the pipeline tests rely on
    from tests.support.outputs import write_series

    paths = write_series(tmp_path)
    vol = synthetic_volume(paths)
    ds = pydicom.dcmread(paths[L3_INDEX])
    assert ds.SOPInstanceUID == vol.sop_instance_uids[L3_INDEX]
    assert np.allclose(ds.pixel_array, vol.hu[L3_INDEX])
