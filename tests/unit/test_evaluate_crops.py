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
    thick_slices,
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


@pytest.mark.slow  # two real crops through the locator: about 3.5 s
def test_the_locator_on_two_real_crops(shared_data: Path) -> None:
    crops = {k: REAL_CROPS[k] for k in ("no pelvis (L4-T11)", "wholly above L3 (T11-L2)")}
    rows = evaluate_real_crops(shared_data, LocatorConfig(), "cpu", crops, chest=False)
    no_pelvis, above = rows
    assert no_pelvis.truth_z_mm is not None and no_pelvis.in_fov and no_pelvis.ok
    assert above.truth_z_mm is None and not above.in_fov and above.ok
    table = format_table(rows)
    assert "no pelvis" in table and "2/2 as they should be" in table
