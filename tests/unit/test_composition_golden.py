"""Golden snapshots of the classical composition method (research.golden).

Label maps (sha256 of the uint8 map), areas (cm², to 1e-6) and mean HU of the development
phantoms 6000-6005 and of the real case's slices z 65-79 must equal
``tests/golden/composition_classical.json``: a change of a rule is a reviewed diff of that
file (regenerate with ``python -m research.golden --write``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.config import CompositionConfig
from research import golden
from worker.composition.measure import segment_slice

EXPECTED: dict[str, Any] = json.loads(golden.GOLDEN_FILE.read_text())
CFG = CompositionConfig()


@pytest.fixture(scope="module")
def phantoms() -> dict[str, tuple[int, np.ndarray, tuple[float, float]]]:
    """The development phantoms' mid-L3 slices, generated once for the module."""
    return {seed: (k, hu, sp) for seed, k, hu, sp in golden.phantom_slices()}


@pytest.fixture(scope="module")
def real(shared_data: Path) -> dict[str, tuple[np.ndarray, tuple[float, float]]]:
    """The real case's golden slices (skips when the data folder is absent)."""
    return {z: (hu, sp) for z, hu, sp in golden.real_slices(shared_data)}


def _check(group: str, case: str, got: dict[str, Any]) -> None:
    want = {group: {case: EXPECTED[group][case]}}
    diffs = golden.differences(want, {group: {case: got}})
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("seed", sorted(EXPECTED["phantoms"]))
def test_phantom_labels_and_measures_equal_the_golden_file(seed: str, phantoms) -> None:
    k, hu, sp = phantoms[seed]
    seg = segment_slice(hu, sp, CFG)
    got = golden.record(seg.labels, hu, sp, seg.qa_flags)
    got["slice"] = k
    got["hu_sha256"] = EXPECTED["phantoms"][seed]["hu_sha256"]
    # the phantom itself has not changed (else the snapshot compares other images)
    import hashlib

    assert (
        hashlib.sha256(np.ascontiguousarray(hu, np.float32).tobytes()).hexdigest()
        == (EXPECTED["phantoms"][seed]["hu_sha256"])
    )
    _check("phantoms", seed, got)


@pytest.mark.parametrize("z", sorted(EXPECTED["real"], key=int))
def test_real_case_labels_and_measures_equal_the_golden_file(z: str, real) -> None:
    hu, sp = real[z]
    seg = segment_slice(hu, sp, CFG)
    _check("real", z, golden.record(seg.labels, hu, sp, seg.qa_flags))


def test_a_changed_area_is_reported_as_a_difference() -> None:
    case = next(iter(EXPECTED["real"] or EXPECTED["phantoms"]))
    group = "real" if EXPECTED["real"] else "phantoms"
    rec = json.loads(json.dumps(EXPECTED[group][case]))
    rec["measures"]["sma"]["area_cm2"] += 1e-3
    rec["labels_sha256"] = "0" * 64
    diffs = golden.differences({group: {case: EXPECTED[group][case]}}, {group: {case: rec}})
    assert len(diffs) == 2 and any("sma: area_cm2" in d for d in diffs)
