"""The classical method's building blocks alone: exact fast morphology, the steps, params."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import polygon

from core import labels as lab
from core.config import CompositionConfig, load_config
from research.evaluate_composition import synthetic_l3
from worker.composition import morphology as mo
from worker.composition.body import classify_tissue, find_body
from worker.composition.classical import find_imat, label_map, run_steps, split_fat
from worker.composition.psoas import find_psoas
from worker.composition.state import SliceState
from worker.composition.vertebra import find_vertebra
from worker.composition.wall import find_wall, find_wall_muscles, without_spikes

CFG = CompositionConfig()


def _masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for t in range(n):
        shape = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        m = ndimage.gaussian_filter(rng.random(shape), rng.uniform(1, 4)) > rng.uniform(0.45, 0.55)
        if t == 0:
            m[:] = False
        if t == 1:
            m[:] = True
        yield m, rng.uniform(0, 14)


def test_disk_operations_equal_scipy_with_the_disk() -> None:
    pairs = [
        (mo.dilate_disk, ndimage.binary_dilation),
        (mo.erode_disk, ndimage.binary_erosion),
        (mo.open_disk, ndimage.binary_opening),
        (mo.close_disk, ndimage.binary_closing),
    ]
    for m, r in _masks(40):
        for fast, ref in pairs:
            assert np.array_equal(fast(m, r), ref(m, structure=mo.disk(r))), (fast.__name__, r)
        assert np.array_equal(mo.fill_holes(m), ndimage.binary_fill_holes(m))


@pytest.mark.parametrize("integral", [False, True])
def test_polygon_mask_equals_skimage(integral: bool) -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        n = int(rng.integers(3, 60))
        a = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(2, 30, n)
        ys = rng.uniform(0, shape[0]) + np.sin(a) * r
        xs = rng.uniform(0, shape[1]) + np.cos(a) * r
        if integral:
            ys, xs = np.round(ys), np.round(xs)
        ref = np.zeros(shape, bool)
        rr, cc = polygon(ys, xs, shape=shape)
        ref[rr, cc] = True
        assert np.array_equal(mo.polygon_mask(shape, ys, xs), ref)


def test_steps_run_alone_on_a_state_and_compose_to_run_steps() -> None:
    hu, truth, sp = synthetic_l3(1.0)
    state = SliceState(hu.astype(np.float32), sp, CFG)
    find_body(state)
    assert state.body is not None and state.body[truth > 0].mean() > 0.99
    classify_tissue(state)
    find_wall(state)
    # the wall region holds the viscera and no subcutaneous fat
    assert state.inner[truth == lab.VAT].mean() > 0.97
    assert state.inner[truth == lab.SAT].mean() < 0.05
    find_vertebra(state)
    assert state.vertebra is not None and state.vertebra.sum() > 300
    # at most its partial-volume rim lies on the true muscle
    assert (truth[state.vertebra] == lab.SMA).mean() < 0.05
    find_wall_muscles(state)
    wall_only = state.sma.copy()
    find_psoas(state)
    assert state.sma.sum() > wall_only.sum()  # the psoas are added beside the vertebra
    find_imat(state)
    split_fat(state)
    labels = label_map(state)
    assert np.array_equal(labels, label_map(run_steps(hu, sp, CFG)))


def test_without_spikes_cuts_a_narrow_spike_and_keeps_a_one_sided_rise() -> None:
    thick = np.full(360, 10.0)
    thick[100:103] = 40.0  # a 3-ray spike of 30 units
    thick[200:260] = 30.0  # a broad rise: one side of its edge is as thick
    out = without_spikes(thick, np.ones(360, bool), 1.0, CFG.classical)
    assert np.all(out[100:103] == 10.0)
    assert np.all(out[200:260] == 30.0)
    # rays that may not be cut keep their thickness
    kept = without_spikes(thick, np.zeros(360, bool), 1.0, CFG.classical)
    assert np.array_equal(kept, thick)


def test_classical_params_nest_under_composition_and_accept_the_flat_keys() -> None:
    cfg = load_config(environ={"L3SPOT__COMPOSITION__CLASSICAL__SKIN_MM": "3"})
    assert cfg.composition.classical.skin_mm == 3.0
    legacy = CompositionConfig.model_validate({"skin_mm": 5.0, "psoas_hole_mm2": 0.0})
    assert legacy.classical.skin_mm == 5.0 and legacy.classical.psoas_hole_mm2 == 0.0
    with pytest.raises(ValueError):
        CompositionConfig.model_validate({"classical": {"no_such_key": 1}})
    # every threshold says where its value comes from
    for name, field in type(CFG.classical).model_fields.items():
        assert field.description, name
