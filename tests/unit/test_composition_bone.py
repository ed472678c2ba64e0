"""L3 vertebral body trabecular attenuation (worker/composition/bone.py, issue 15)."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import CompositionConfig
from core.result import AnalysisResult, L3Result, composition_fields, result_csv_row
from worker.composition.bone import (
    MIN_ROI_MM2,
    TrabecularAttenuation,
    measure_trabecular_attenuation,
    trabecular_roi,
)
from worker.phantom import Phantom, PhantomSpec, generate_phantom

CFG = CompositionConfig()
_CACHE: dict[int, Phantom] = {}


def _phantom(seed: int) -> Phantom:
    """Abdomen phantom with 2 mm contiguous slices (the L3 slice has neighbours within 3 mm)."""
    if seed not in _CACHE:
        spec = PhantomSpec(
            fov="abdomen", slice_thickness_mm=2.0, slice_spacing_mm=2.0, with_labels=False
        )
        _CACHE[seed] = generate_phantom(seed, spec)
    return _CACHE[seed]


def _at_mid_l3(seed: int) -> tuple[Phantom, TrabecularAttenuation]:
    ph = _phantom(seed)
    return ph, measure_trabecular_attenuation(ph.volume, int(ph.truth.l3_mid_slice_index), CFG)


# seeds: 6001 and 6004 normal bone, 6002 and 6005 the osteoporosis variant
@pytest.mark.parametrize(
    "seed",
    # one seed in the quick subset; the others (about 2.5 s each) with the slow tests
    [6001, *(pytest.param(s, marks=pytest.mark.slow) for s in (6002, 6004, 6005))],
)
def test_trabecular_hu_matches_the_phantoms_cancellous_bone(seed: int) -> None:
    ph, got = _at_mid_l3(seed)
    canc = float(ph.anatomy.extra["canc"])  # the phantom's cancellous HU (anatomy.py)
    assert got.mean_hu is not None, got.reason
    # the noise averages out over >= 1000 pixels; partial volume of the rim may add a little
    assert got.mean_hu == pytest.approx(canc, abs=15.0)
    assert len(got.slices) == 3  # L3 and its neighbours at +/- 2 mm
    assert got.roi is not None and got.roi_area_cm2 * 100 >= MIN_ROI_MM2


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_osteoporotic_phantom_reads_lower() -> None:
    normal = [_at_mid_l3(s)[1].mean_hu for s in (6001, 6004)]
    osteo = [_at_mid_l3(s)[1].mean_hu for s in (6002, 6005)]
    assert all(v is not None for v in normal + osteo)
    assert max(osteo) < min(normal) - 50  # type: ignore[type-var, operator]


@pytest.mark.parametrize("seed", [6001, 6005])
def test_roi_excludes_the_cortex(seed: int) -> None:
    ph, got = _at_mid_l3(seed)
    assert got.roi is not None and got.mean_hu is not None
    cort = float(ph.anatomy.extra["cort"]) * 0.95  # vertebral body cortex (skeleton.py)
    hu = ph.volume.hu[int(ph.truth.l3_mid_slice_index)]
    assert got.mean_hu < 0.5 * cort
    # no cortical pixel in the ROI: the brightest ROI pixels are noise over cancellous bone
    canc = float(ph.anatomy.extra["canc"])
    assert np.percentile(hu[got.roi], 99.5) < canc + 4.5 * ph.anatomy.noise_hu
    # nor the posterior third of the body: the ROI is its anterior part
    ys = np.nonzero(got.roi)[0]
    body_rows = np.nonzero(hu[:, int(np.median(np.nonzero(got.roi)[1]))] > 0.6 * cort)[0]
    assert ys.max() < body_rows.max()


def test_no_vertebra_on_the_slice_is_refused_with_a_reason() -> None:
    ph = _phantom(6001)
    k = int(ph.truth.l3_mid_slice_index)
    vol = ph.volume
    hu = vol.hu.copy()
    hu[k][hu[k] > 150] = 40.0  # no bone at all on the L3 slice
    vol2 = type(vol)(**{**vol.__dict__, "hu": hu})
    got = measure_trabecular_attenuation(vol2, k, CFG)
    assert got.mean_hu is None and got.roi is None
    assert got.reason and "no vertebral body" in got.reason


def test_too_small_a_body_or_roi_is_refused() -> None:
    body = np.zeros((100, 100), bool)
    body[40:62, 40:70] = True  # 22 x 30 mm at 1 mm: big enough to be a body
    roi, why = trabecular_roi(body, (1.0, 1.0))
    assert roi is not None and why is None
    # at 0.45 mm pixels the same pixels are a 10 x 13.5 mm structure: not a vertebral body
    roi, why = trabecular_roi(body, (0.45, 0.45))
    assert roi is None and why and "not a vertebral body" in why
    # a body of the right extent whose ROI is under MIN_ROI_MM2: a thin oblique band (what
    # is left of a crushed or malformed body), nothing 3 mm inside it
    yy, xx = np.mgrid[0:100, 0:100]
    band = (np.abs((yy - 40) - 0.8 * (xx - 30)) < 3) & (xx >= 30) & (xx < 56)
    roi, why = trabecular_roi(band, (1.0, 1.0))
    assert roi is None and why and "smaller than" in why


def test_spinal_hardware_is_refused_not_measured() -> None:
    ph, got = _at_mid_l3(6007)  # phantom 6007 has pedicle screws at L3
    assert ph.anatomy.extra.get("metal_kind") == "spine"
    assert got.mean_hu is None and got.reason and "metal" in got.reason


def test_a_disc_level_is_refused() -> None:
    ph = _phantom(6001)
    z0 = ph.truth.l3_z_range_mm[0]
    k = int(np.argmin(np.abs(ph.volume.z_mm - (z0 - 4.0))))  # the L3-L4 disc
    got = measure_trabecular_attenuation(ph.volume, k, CFG)
    assert got.mean_hu is None and got.reason


def test_result_json_and_csv_carry_the_value_or_the_reason() -> None:
    class Comp:  # what composition_fields reads
        measures: dict = {}
        smi_cm2_per_m2 = None
        smi_reason = None
        bmi_kg_per_m2 = None
        sarcopenia = None
        method = "classical"
        trabecular = TrabecularAttenuation(
            mean_hu=123.456, sd_hu=40.0, roi_area_cm2=4.321, pixel_count=900, slices=[4, 5, 6]
        )

    fields = composition_fields(Comp())  # type: ignore[arg-type]
    res = AnalysisResult(
        study_instance_uid="1.2",
        series_instance_uid="1.3",
        l3=L3Result(in_field_of_view=True),
        **fields,  # type: ignore[arg-type]
    )
    again = AnalysisResult.model_validate_json(res.to_json())
    assert again.l3_trabecular is not None
    assert again.l3_trabecular.mean_hu == pytest.approx(123.456)
    assert again.l3_trabecular.slices_averaged == [4, 5, 6]
    assert result_csv_row(again)["l3_trabecular_mean_hu"] == "123.456"
    Comp.trabecular = TrabecularAttenuation(None, reason="no vertebral body found")
    refused = composition_fields(Comp())["l3_trabecular"]  # type: ignore[arg-type]
    assert refused.mean_hu is None and refused.reason == "no vertebral body found"  # type: ignore[union-attr]
