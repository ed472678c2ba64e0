"""The CT phantom: determinism, ground truth, tissue labels, written DICOM and NIfTI series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from core import labels as tl
from worker.mip import frontal_mip
from worker.phantom import (
    PhantomSpec,
    generate_phantom,
    generate_phantom_mip,
    write_phantom,
)
from worker.volume.load import load_series

#: small phantoms: fast, yet every structure is present
SMALL = {"rows": 96, "cols": 96, "pixel_spacing_mm": 4.5, "slice_thickness_mm": 5.0}


def _spec(**kw: object) -> PhantomSpec:
    return PhantomSpec(**{**SMALL, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def abdomen():
    """A realistic-resolution abdomen slab around L3 is costly; use 2 mm pixels."""
    return generate_phantom(
        5,
        PhantomSpec(
            fov="abdomen",
            rows=200,
            cols=200,
            pixel_spacing_mm=2.0,
            slice_thickness_mm=5.0,
            arms="down",
        ),
    )


def test_same_seed_gives_identical_phantom():
    a = generate_phantom(42, _spec())
    b = generate_phantom(42, _spec())
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.volume.z_mm, b.volume.z_mm)
    assert a.truth.to_json() == b.truth.to_json()


def test_different_seeds_give_different_patients():
    a = generate_phantom(1, _spec(fov="abdomen"))
    b = generate_phantom(2, _spec(fov="abdomen"))
    assert a.truth.to_json() != b.truth.to_json()
    assert a.volume.hu.shape != b.volume.hu.shape or not np.array_equal(a.volume.hu, b.volume.hu)


@pytest.mark.parametrize("seed", [0, 3, 8, 21])
def test_mid_l3_slice_lies_inside_the_l3_body(seed: int):
    ph = generate_phantom(seed, _spec(fov="abdomen_pelvis"))
    t = ph.truth
    assert t.l3_in_fov
    lo, hi = t.l3_z_range_mm
    assert 20.0 < hi - lo < 40.0  # ANATOMY.md: lumbar body height 25-30 mm, scaled by stature
    assert lo < t.l3_mid_z_mm < hi
    z = ph.volume.z_mm[t.l3_mid_slice_index]
    assert abs(z - t.l3_mid_z_mm) <= ph.volume.slice_spacing_mm / 2 + 1e-6


def _levels_top_down(truth) -> list[str]:
    names = [n for n in truth.vertebrae_z_mm if n != "S1"]
    return sorted(names, key=lambda n: -truth.vertebrae_z_mm[n][0])


@pytest.mark.parametrize(
    ("n_rib", "n_lumbar"), [(12, 5), (11, 6), (13, 4), (12, 4), (12, 6), (11, 5)]
)
def test_l3_is_third_vertebra_below_the_last_rib_bearing_one(n_rib: int, n_lumbar: int):
    ph = generate_phantom(7, _spec(fov="abdomen", n_rib_pairs=n_rib, n_lumbar=n_lumbar))
    t = ph.truth
    order = _levels_top_down(t)
    assert order[:7] == [f"C{i}" for i in range(1, 8)]
    assert order[7 : 7 + n_rib] == [f"T{i}" for i in range(1, n_rib + 1)]
    assert order.index("L3") == order.index(f"T{n_rib}") + 3
    assert t.variants["n_rib_pairs"] == n_rib
    assert t.variants["n_lumbar"] == n_lumbar
    assert t.variants["n_presacral"] == 7 + n_rib + n_lumbar
    assert (t.variants["transitional"] is None) == (n_rib == 12 and n_lumbar == 5)
    # ribs exist on exactly the thoracic vertebrae
    rib_levels = [v.name for v in ph.anatomy.vertebrae if v.rib]
    assert rib_levels == [f"T{i}" for i in range(n_rib, 0, -1)]


def test_vertebrae_are_stacked_without_overlap_and_lumbar_grow_downwards():
    t = generate_phantom(4, _spec(fov="abdomen")).truth
    order = _levels_top_down(t)
    spans = [t.vertebrae_z_mm[n] for n in order]
    for (b_up, _), (_, t_low) in zip(spans, spans[1:], strict=False):
        assert t_low < b_up  # a disc between consecutive bodies
    l1 = np.diff(t.vertebrae_z_mm["L1"])[0]
    l5 = np.diff(t.vertebrae_z_mm["L5"])[0]
    assert l5 > l1 * 0.95


def test_chest_field_of_view_does_not_contain_l3():
    for seed in (0, 1, 2):
        ph = generate_phantom(seed, _spec(fov="chest"))
        assert ph.truth.l3_in_fov is False
        assert ph.truth.l3_mid_slice_index is None
        assert ph.truth.l3_z_range_mm[1] < ph.volume.z_mm[0]  # L3 lies below the scan


def test_iliac_crest_and_femoral_heads_are_placed_as_in_anatomy_references():
    for seed in range(6):
        t = generate_phantom(seed, _spec(fov="pelvis")).truth
        crest = t.landmarks_z_mm["iliac_crest_top"]
        # crest between the L5 body and the L3-L4 disc (ANATOMY.md: mostly L4 / L4-L5)
        assert t.vertebrae_z_mm["L5"][0] - 15 < crest < t.vertebrae_z_mm["L3"][0] + 1
        fh = t.landmarks_z_mm["femoral_head_centre"]
        assert 90 < crest - fh < 170


def test_tissue_labels_are_plausible_at_l3(abdomen):
    ph = abdomen
    i = ph.truth.l3_mid_slice_index
    lab = ph.labels[i]
    hu = ph.volume.hu[i]
    assert set(np.unique(lab)) <= {0, tl.SMA, tl.IMAT, tl.VAT, tl.SAT}
    for value in (tl.SMA, tl.VAT, tl.SAT):
        assert (lab == value).sum() > 50
    # muscle and fat HU (Mitsiopoulos et al. 1998 ranges) despite noise
    assert -29 < hu[lab == tl.SMA].mean() < 150
    assert -190 < hu[lab == tl.SAT].mean() < -30
    assert -190 < hu[lab == tl.VAT].mean() < -30
    # SAT lies outside the muscle wall: no SAT pixel touches a VAT pixel
    vat_grown = ndimage.binary_dilation(lab == tl.VAT)
    assert not (vat_grown & (lab == tl.SAT)).any()
    # VAT lies inside: its pixels are closer to the body centre than the SAT ring
    body = ndimage.binary_fill_holes(hu > -500)
    cy, cx = ndimage.center_of_mass(body)
    yy, xx = np.nonzero(lab == tl.VAT)
    ys, xs = np.nonzero(lab == tl.SAT)
    assert np.median(np.hypot(yy - cy, xx - cx)) < np.median(np.hypot(ys - cy, xs - cx))


def test_labels_exist_at_every_slice(abdomen):
    assert abdomen.labels.shape == abdomen.volume.hu.shape
    per_slice = (abdomen.labels == tl.SAT).sum(axis=(1, 2))
    assert (per_slice > 0).all()


def test_mip_fast_path_equals_mip_of_the_volume():
    spec = _spec(fov="abdomen_pelvis")
    fast = generate_phantom_mip(9, spec, pixel_mm=4.5)
    full = frontal_mip(generate_phantom(9, spec).volume, 4.5)
    np.testing.assert_allclose(fast.mip.image, full.image, atol=1e-3)
    assert fast.truth.to_json() == generate_phantom(9, spec).truth.to_json()


def test_bone_is_brighter_than_soft_tissue_in_the_mip(abdomen):
    mip = frontal_mip(abdomen.volume, 2.0)
    row = int(round(float(mip.z_to_row(abdomen.truth.l3_mid_z_mm))))
    line = mip.image[row]
    centre = len(line) // 2
    assert line[centre - 8 : centre + 8].max() > 300  # vertebral body / spinous process
    assert line[centre - 8 : centre + 8].max() > np.percentile(line, 25) + 150


def test_invalid_specs_raise_value_error():
    with pytest.raises(ValueError, match="fov"):
        generate_phantom(0, _spec(fov="knee"))
    with pytest.raises(ValueError, match="n_lumbar"):
        generate_phantom(0, _spec(n_lumbar=3))
    with pytest.raises(ValueError):
        generate_phantom(0, _spec(pixel_spacing_mm=-1.0))


def test_rectus_diastasis_opens_only_the_anterior_midline_of_the_muscle_wall():
    """``rectus_gap_mm``: the recti apart in the midline, the gap visceral fat under a thin
    linea alba (label 0, soft-tissue HU); nothing else of the phantom changes (no random
    draw), and the default spec leaves every phantom as it was."""
    spec = {"fov": "abdomen", "rows": 160, "cols": 160, "pixel_spacing_mm": 1.5}
    base = generate_phantom(7, _spec(**spec))
    gap = generate_phantom(7, _spec(**spec, rectus_gap_mm=50.0, linea_alba_mm=2.0))
    assert gap.truth.variants["rectus_diastasis_mm"] == 50.0
    assert "rectus_diastasis_mm" not in base.truth.variants
    np.testing.assert_array_equal(gap.volume.z_mm, base.volume.z_mm)
    k = int(base.truth.l3_mid_slice_index)
    changed = gap.labels[k] != base.labels[k]
    ys, xs = np.nonzero(changed)
    assert changed.any()
    # anterior half, within 25 mm (+ one pixel) of the trunk's midline, where the wall was
    body = base.labels[k] > 0
    cy, cx = (float(v) for v in ndimage.center_of_mass(body))
    assert (ys < cy).all() and (np.abs(xs - cx) * 1.5 <= 25.0 + 1.5 + 15.0).all()
    assert np.isin(base.labels[k][changed], (tl.SMA, tl.IMAT)).all()
    new = gap.labels[k][changed]
    assert set(np.unique(new)) <= {tl.VAT, 0} and (new == tl.VAT).mean() > 0.6
    linea = changed & (gap.labels[k] == 0)
    assert linea.any() and (np.abs(gap.volume.hu[k][linea]) < 150).mean() > 0.9
    # outside the gap nothing changed; above L1 no gap
    assert np.array_equal(gap.volume.hu[k][~changed], base.volume.hu[k][~changed])
    top = int(np.argmin(np.abs(gap.volume.z_mm - gap.truth.vertebrae_z_mm["T11"][1])))
    np.testing.assert_array_equal(gap.labels[top], base.labels[top])
    with pytest.raises(ValueError, match="rectus_gap_mm"):
        generate_phantom(0, _spec(rectus_gap_mm=-1.0))


def test_written_dicom_series_loads_back_with_its_geometry(tmp_path: Path):
    ph = generate_phantom(12, _spec(fov="abdomen", rows=64, cols=80))
    series = write_phantom(ph, tmp_path, fmt="dicom")
    vol = load_series(series)
    assert vol.shape == ph.volume.shape
    np.testing.assert_allclose(vol.z_mm, ph.volume.z_mm, atol=1e-3)
    np.testing.assert_allclose(vol.pixel_spacing_mm, ph.volume.pixel_spacing_mm)
    np.testing.assert_allclose(vol.hu, np.rint(ph.volume.hu), atol=1.0)
    assert vol.patient.sex == ph.truth.patient["sex"]
    assert vol.patient.size_m == pytest.approx(ph.truth.patient["height_m"], abs=0.01)
    ds = pydicom.dcmread(sorted(series.glob("*.dcm"))[0])
    assert ds.Modality == "CT"
    assert str(ds.PatientName) == "PHANTOM^12"
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth["series_instance_uid"] == vol.series_instance_uid
    assert truth["l3_mid_slice_index"] == ph.truth.l3_mid_slice_index
    assert vol.nearest_slice(truth["l3_mid_z_mm"]) == truth["l3_mid_slice_index"]


def test_written_nifti_loads_back_in_the_same_orientation(tmp_path: Path):
    ph = generate_phantom(13, _spec(fov="abdomen", rows=64, cols=80))
    path = write_phantom(ph, tmp_path, fmt="nifti")
    vol = load_series(path)
    assert vol.shape == ph.volume.shape
    np.testing.assert_allclose(vol.z_mm, ph.volume.z_mm, atol=1e-3)
    np.testing.assert_allclose(vol.hu, np.rint(ph.volume.hu), atol=1.0)
    assert (tmp_path / "labels.nii.gz").is_file()
    assert (tmp_path / "ground_truth.json").is_file()


def test_cli_writes_a_phantom(tmp_path: Path):
    from typer.testing import CliRunner

    from l3spot import app

    res = CliRunner().invoke(
        app,
        [
            "phantom",
            "--out",
            str(tmp_path),
            "--seed",
            "3",
            "--fov",
            "chest",
            "--rows",
            "48",
            "--cols",
            "48",
            "--pixel-spacing",
            "7",
            "--slice-thickness",
            "5",
            "--format",
            "nifti",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "L3 not in field of view" in res.output
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth["fov"] == "chest" and truth["l3_in_fov"] is False
