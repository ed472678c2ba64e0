"""Phantom style B (research.phantom_b, issue 15): determinism, vertebra count and order,
L3 truth, transitional variants, ribs on thoracic vertebrae only, iliac crest level, a
written series that loads with its spine bright in the MIP, and that it differs from
style A."""

from __future__ import annotations

import numpy as np
import pytest

from research.phantom_b import StyleBSpec, generate, generate_truth, write_series
from research.phantom_b.body import sample_body
from research.phantom_b.skeleton import build
from worker.mip import frontal_mip
from worker.phantom import PhantomSpec, generate_phantom
from worker.volume.load import load_series

#: small and coarse: every structure is there, each phantom well under a second
SMALL = {"size": 48, "pixel_mm": 6.0, "slice_thickness_mm": 5.0}


def _bodies(n: int, first: int = 7_100_000, bones: bool = True, **fixed):
    for s in range(first, first + n):
        rng = np.random.default_rng([s, 0xB])
        body = sample_body(s, rng, **fixed)
        if bones:
            build(body, rng)
        yield body


def _names_from_top(n_ribs: int, n_lumbar: int) -> list[str]:
    cervical = [f"C{i}" for i in range(3, 8)]
    return (
        cervical
        + [f"T{i}" for i in range(1, n_ribs + 1)]
        + [f"L{i}" for i in range(1, n_lumbar + 1)]
    )


@pytest.mark.slow
def test_same_seed_same_phantom_other_seed_other_patient():
    a_vol, a_truth = generate(7_000_123, StyleBSpec(fov="lumbar", **SMALL))
    b_vol, b_truth = generate(7_000_123, StyleBSpec(fov="lumbar", **SMALL))
    np.testing.assert_array_equal(a_vol.hu, b_vol.hu)
    np.testing.assert_array_equal(a_vol.z_mm, b_vol.z_mm)
    assert a_truth.to_json() == b_truth.to_json()
    _, c_truth = generate(7_000_124, StyleBSpec(fov="lumbar", **SMALL))
    assert c_truth.to_json() != a_truth.to_json()


def test_vertebrae_in_order_from_the_sacrum_and_l3_is_third_below_the_last_rib():
    vol, truth = generate(7_000_200, StyleBSpec(fov="abdomen", n_lumbar=5, n_rib_pairs=12, **SMALL))
    v = truth.vertebrae_z_mm
    from_top = sorted(v, key=lambda n: -v[n][0])
    assert from_top == _names_from_top(12, 5) + ["S1"]
    from_bottom = sorted(v, key=lambda n: v[n][0])
    assert from_bottom[:7] == ["S1", "L5", "L4", "L3", "L2", "L1", "T12"]
    for lo, hi in zip(from_bottom[:-1], from_bottom[1:], strict=True):
        assert v[lo][1] < v[hi][0]  # a disc between consecutive bodies
    lumbar = [n for n in v if n.startswith("L")]
    heights = {n: v[n][1] - v[n][0] for n in lumbar}
    assert all(22.0 <= h <= 36.0 for h in heights.values())  # ANATOMY.md 25-30, scaled
    assert heights["L1"] < max(heights["L4"], heights["L5"])
    assert truth.l3_in_fov
    assert truth.l3_mid_z_mm == pytest.approx(0.5 * sum(v["L3"]))
    assert vol.z_mm[truth.l3_mid_slice_index] == pytest.approx(truth.l3_mid_z_mm, abs=2.5)
    # counted from the last rib: T12 -> L1 -> L2 -> L3
    last_rib = truth.rib_levels[-1]
    assert last_rib == "T12"
    assert from_bottom.index("L3") == from_bottom.index(last_rib) - 3


@pytest.mark.parametrize(("ribs", "lumbar"), [(11, 6), (13, 4), (12, 4), (12, 6), (11, 5)])
def test_transitional_variants_keep_l3_three_below_the_last_rib(ribs, lumbar):
    spec = StyleBSpec(fov="chest", n_rib_pairs=ribs, n_lumbar=lumbar, **SMALL)
    truth = generate_truth(7_000_300, spec)
    v = truth.vertebrae_z_mm
    assert truth.variants["n_rib_pairs"] == ribs and truth.variants["n_lumbar"] == lumbar
    assert truth.variants["transitional"] is not None
    assert truth.variants["presacral"] == 7 + ribs + lumbar
    assert truth.rib_levels == [f"T{i}" for i in range(1, ribs + 1)]
    assert [n for n in v if n.startswith("L")] == [f"L{i}" for i in range(1, lumbar + 1)]
    below_last_rib = sorted((n for n in v if v[n][1] < v[f"T{ribs}"][0]), key=lambda n: -v[n][0])
    assert below_last_rib[2] == "L3"
    assert not truth.l3_in_fov  # a chest scan stops above L3
    if (ribs, lumbar) == (13, 4):  # the rendered phantom has the same truth
        assert generate(7_000_300, spec)[1].to_json() == truth.to_json()


def test_variants_are_drawn_at_a_few_percent():
    bodies = list(_bodies(300, bones=False))
    share = np.mean([b.transitional is not None for b in bodies])
    assert 0.04 <= share <= 0.25
    assert {b.n_rib_pairs for b in bodies} >= {11, 12, 13}
    assert {b.n_lumbar for b in bodies} >= {4, 5, 6}


def test_ribs_only_on_thoracic_vertebrae_and_floating_ribs_end_above_l3():
    for body in _bodies(20):
        ribs = [t for t in body.tubes if t.kind == "rib"]
        owners = [t.owner for t in ribs]
        thoracic = [lv.name for lv in body.levels if lv.region == "T"]
        assert set(owners) == set(thoracic)
        assert all(owners.count(n) == 2 for n in thoracic)  # a pair per level
        assert all(not lv.ribs for lv in body.levels if lv.region != "T")
        last = body.last_rib_level
        tips = [t.points[:, 2].min() for t in ribs if t.owner == last.name]
        assert min(tips) > body.level("L3").zm  # the last ribs end around L1-L2
        heads = [t.points[0, 2] for t in ribs if t.owner == last.name]
        assert all(abs(h - last.z1) < 5 for h in heads)


def test_iliac_crest_near_l4():
    in_l4_disc_band = 0
    bodies = list(_bodies(200, first=7_200_000, bones=False))
    for body in bodies:
        low, second, third = body.levels[0], body.levels[1], body.levels[2]
        assert low.zm - 11 <= body.crest_z <= third.z0  # upper L5 .. the L3-L4 disc
        in_l4_disc_band += low.z1 <= body.crest_z <= second.z1
        drop = body.crest_z - body.femoral_z  # ANATOMY.md 80-110, scaled; lower crest if tall
        assert 82 * body.k - 10.1 <= drop <= 110 * body.k + 0.1
    assert in_l4_disc_band / len(bodies) >= 0.6  # L4 body / L4-L5 disc in most
    for body in _bodies(3, first=7_200_000):  # the wings' tops are the crest
        wings = [s for s in body.solids if s.kind == "wing"]
        assert len(wings) == 2 and all(w.params["z_top"] == body.crest_z for w in wings)


@pytest.mark.slow
def test_written_series_loads_and_its_mip_is_bright_along_the_spine(tmp_path):
    spec = StyleBSpec(fov="lumbar", size=72, pixel_mm=4.0, slice_thickness_mm=5.0, noise_sd=5.0)
    vol, truth = generate(7_000_400, spec)
    series = write_series(vol, truth, tmp_path)
    loaded = load_series(series)
    assert loaded.hu.shape == vol.hu.shape
    np.testing.assert_allclose(loaded.z_mm, vol.z_mm, atol=0.01)
    assert (tmp_path / "ground_truth.json").is_file()
    mip = frontal_mip(loaded, pixel_mm=4.0)
    row = int(round(mip.z_to_row(truth.l3_mid_z_mm)))
    rng = np.random.default_rng([7_000_400, 0xB])
    body = sample_body(7_000_400, rng)  # same draws as the generator: the spine's x
    x_spine = body.level("L3").x
    col = int(round((x_spine - loaded.image_position_first[0]) / 4.0))
    spine = mip.image[row, col - 1 : col + 2].max()
    lateral = mip.image[row, [col - 16, col + 16]].max()  # 64 mm out: beyond the TP tips
    assert spine > 250.0
    assert spine > lateral + 150.0


def _lag1(patch: np.ndarray) -> float:
    a = patch - patch.mean()
    return float((a[:, 1:] * a[:, :-1]).mean() / (a * a).mean())


def test_the_two_styles_differ_in_noise_texture():
    """Style A's noise is low-pass (Gaussian-smoothed), style B's has a ramp spectrum (a CT
    reconstruction kernel): the lag-1 autocorrelation of the noise in air has opposite signs."""
    a = generate_phantom(
        7,
        PhantomSpec(
            fov="abdomen",
            rows=64,
            cols=64,
            pixel_spacing_mm=5.0,
            slice_thickness_mm=5.0,
            with_labels=False,
            noise_hu=30.0,
        ),
    )
    vb, _ = generate(7, StyleBSpec(fov="abdomen", noise_sd=30.0, **SMALL))
    stats = []
    for hu in (a.volume.hu, vb.hu):
        patch = np.concatenate([hu[:, :6, :6], hu[:, :6, -6:]], axis=2)  # anterior corners: air
        assert np.median(patch) < -900
        stats.append(_lag1(patch.reshape(-1, 12)))
    assert stats[0] > 0.1 > -0.05 > stats[1]
