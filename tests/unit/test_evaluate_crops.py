"""Crops of the real abdomen CT as scanners cut them (issue 15; evaluation data only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.config import LocatorConfig
from research.evaluate_crops import (
    REAL_CROPS,
    crop_volume,
    evaluate_real_crops,
    format_table,
    real_l3_reference_z_mm,
    thick_slices,
    vertebral_body_mid_index,
)
from worker.volume.load import CTVolume


def _volume(n: int = 10, dz: float = 3.0) -> CTVolume:
    hu = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 4, 5), np.float32)
    return CTVolume(
        hu=hu,
        z_mm=100.0 + dz * np.arange(n),
        pixel_spacing_mm=(1.0, 1.0),
        sop_instance_uids=[f"1.2.{i}" for i in range(n)],
        image_position_first=(0.0, 0.0, 100.0),
    )


def test_a_crop_keeps_the_slices_their_z_and_their_identifiers() -> None:
    c = crop_volume(_volume(), 2, 5)
    assert c.hu.shape[0] == 4 and c.z_mm.tolist() == [106.0, 109.0, 112.0, 115.0]
    assert c.sop_instance_uids == ["1.2.2", "1.2.3", "1.2.4", "1.2.5"]
    assert c.image_position_first[2] == 106.0 and float(c.hu[0, 0, 0]) == 2.0
    with pytest.raises(ValueError):
        crop_volume(_volume(), 5, 10)


def test_thick_slices_average_the_source_slices_of_each_slab() -> None:
    t = thick_slices(_volume(10, 1.0), 5.0)  # z 100..109 -> centres 100, 105
    assert t.z_mm.tolist() == [100.0, 105.0] and t.slice_thickness_mm == 5.0
    assert float(t.hu[0, 0, 0]) == pytest.approx(np.mean([0, 1, 2]))  # |z - 100| <= 2.5
    assert float(t.hu[1, 0, 0]) == pytest.approx(np.mean([3, 4, 5, 6, 7]))
    assert t.sop_instance_uids == []


def test_the_crops_include_a_short_lumbar_window_5_mm_slices_and_one_above_l3() -> None:
    lengths = {name: (b - a + 1) * 3 for name, (a, b, _) in REAL_CROPS.items()}
    assert min(lengths.values()) <= 150 and any(t == 5.0 for *_, t in REAL_CROPS.values())
    above = [name for name, (a, _, _) in REAL_CROPS.items() if a > 79]  # L3 label ends at 79
    assert above


def _vertebra_with_a_low_spinous_process() -> np.ndarray:
    """(z, y, x) labels, y anterior -> posterior: a body (label 3) in rows 2..5 over slices
    5..13, the cord (9) in rows 7..8, and posterior elements (3) in rows 10..12 over slices
    1..10, hanging below the body as a lumbar spinous process does."""
    labels = np.zeros((16, 14, 9), np.int16)
    labels[5:14, 2:6, 2:7] = 3
    labels[:, 7:9, 4] = 9
    labels[1:11, 10:13, 3:6] = 3
    return labels


def test_the_reference_is_the_body_middle_not_the_middle_of_the_whole_label() -> None:
    """Repro: the real case's reference was the middle of the whole L3 label's z extent
    (slices 65..79 -> 72), spinous process included; the phantoms' truth, and the L3 slice,
    is the body's middle between its end plates."""
    labels = _vertebra_with_a_low_spinous_process()
    zs = np.flatnonzero((labels == 3).any(axis=(1, 2)))
    assert 0.5 * (zs[0] + zs[-1]) == 7.0  # the whole label: slices 1..13
    assert vertebral_body_mid_index(labels, 3, 9) == 9.0  # the body: slices 5..13


def test_the_body_middle_needs_the_vertebra_and_the_cord() -> None:
    labels = _vertebra_with_a_low_spinous_process()
    with pytest.raises(ValueError, match="not in the label map"):
        vertebral_body_mid_index(np.where(labels == 9, 0, labels), 3, 9)
    with pytest.raises(ValueError, match="not in the label map"):
        vertebral_body_mid_index(labels, 4, 9)
    behind = np.where(labels == 3, 0, labels)
    behind[1:11, 10:13, 3:6] = 3  # posterior elements only
    with pytest.raises(ValueError, match="in front of the spinal cord"):
        vertebral_body_mid_index(behind, 3, 9)


def test_the_real_reference_is_the_l3_body_middle_two_slices_above_the_label_middle(
    shared_data: Path,
) -> None:
    """The real L3 body spans slices 70..78 through its centre (27 mm at 3 mm slices): its
    middle is slice 74, z 316.3 mm; the whole label's middle, 72, is 6 mm lower."""
    z = 94.3018 + 3.0 * np.arange(112)  # ct.nii.gz's slice z (mm)
    assert real_l3_reference_z_mm(shared_data, z) == pytest.approx(z[74], abs=0.01)


@pytest.mark.slow  # two real crops through the locator: about 3.5 s
def test_the_locator_on_two_real_crops(shared_data: Path) -> None:
    crops = {k: REAL_CROPS[k] for k in ("no pelvis (L4-T11)", "wholly above L3 (T11-L2)")}
    rows = evaluate_real_crops(shared_data, LocatorConfig(), "cpu", crops, chest=False)
    no_pelvis, above = rows
    assert no_pelvis.truth_z_mm is not None and no_pelvis.in_fov and no_pelvis.ok
    assert no_pelvis.label_mid_z_mm == pytest.approx(no_pelvis.truth_z_mm - 6.0, abs=0.01)
    assert above.truth_z_mm is None and not above.in_fov and above.ok
    assert above.label_mid_z_mm is None and above.row()["label_mid_error_mm"] is None
    table = format_table(rows)
    assert "no pelvis" in table and "2/2 as they should be" in table
