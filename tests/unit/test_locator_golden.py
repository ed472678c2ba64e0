"""The shipped locator gives the same answers as before the locator was split (issue 13).

Reference values: both shipped stages (``models/locator_cnn4_round3.pt`` then
``models/locator_fine_cnn4.pt``) run by the pre-split ``worker/locator/coarse.py`` on
held-out phantoms (seeds above the training seeds) and the real cases in ``../shared/data``.
A change of module layout must not move a single slice; a retrained model changes these
numbers on purpose, in a reviewed diff. The real abdomen's values are also checked through
the whole pipeline (``tests/unit/test_pipeline.py``).

These are the two locator stages alone (``locator.verify_weights`` off): the level
verification that follows them (issue 15) has its own tests (``test_vertebrae*.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import LocatorConfig
from worker.locator.locate import locate_l3
from worker.mip import FrontalMips

#: seed -> (L3 slice index, z of the decision (mm), raw confidence); None = not in field of view
#: (the reported ``confidence`` is the calibrated one, models/locator_cnn4.md, issue 15)
PHANTOMS: dict[int, tuple[int, float, float] | None] = {
    2_000_001: (106, 133.0583805560325, 0.45954439385041546),
    2_000_002: (91, 263.7463660024489, 0.992854597351531),
    2_000_003: (120, 240.13344815010896, 0.8611567760297062),
    2_000_004: (203, 601.2425087748284, 0.9964141912799596),
    2_000_005: None,
}


def _shipped() -> LocatorConfig:
    cfg = LocatorConfig(verify_weights=None)
    assert cfg.weights.is_file(), f"shipped first-stage weights missing: {cfg.weights}"
    assert cfg.refine_weights is not None and cfg.refine_weights.is_file(), (
        f"shipped refinement weights missing: {cfg.refine_weights}"
    )
    return cfg


@pytest.mark.parametrize("seed", sorted(PHANTOMS))
def test_shipped_locator_gives_the_reference_slice_on_held_out_phantoms(seed: int) -> None:
    from worker.training.locator import phantom_volume

    cfg = _shipped()
    vol, _ = phantom_volume(seed, training=True)
    mips = FrontalMips(vol)
    res = locate_l3(vol, cfg, mips, device="cpu")
    assert mips.projections == 1  # both stages from one projection
    want = PHANTOMS[seed]
    if want is None:
        assert not res.in_field_of_view and res.slice_index is None
        return
    assert res.in_field_of_view
    assert res.slice_index == want[0]
    assert res.z_mm == pytest.approx(want[1], abs=1e-3)
    assert res.confidence_raw == pytest.approx(want[2], abs=1e-4)


def test_shipped_locator_gives_the_reference_answers_on_the_real_cases(shared_data: Path) -> None:
    from worker.training.locator import load_volume_any

    cfg = _shipped()
    vol = load_volume_any(shared_data / "abdomen_ct_totalseg" / "ct.nii.gz")
    res = locate_l3(vol, cfg, device="cpu")
    assert res.in_field_of_view and res.slice_index == 74
    assert res.z_mm == pytest.approx(314.81412506103516, abs=1e-3)
    assert res.mip_row == pytest.approx(37.49587758382162, abs=1e-3)
    assert res.confidence_raw == pytest.approx(0.48521645250270085, abs=1e-4)
    assert res.confidence_calibrated  # the shipped weights carry their calibration
    chest = load_volume_any(shared_data / "chest_ct_lidc")
    res = locate_l3(chest, cfg, device="cpu")
    assert not res.in_field_of_view and res.slice_index is None
