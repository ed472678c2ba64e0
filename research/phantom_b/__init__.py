"""Phantom style B: a second, independently written CT phantom, for validation only.

Issue 15: the locator is trained on :mod:`worker.phantom` (style A) and must learn L3, not
that generator. Style B differs on purpose (see ``docs/phantom.md``, "Style B"): vertebral
bodies are waisted rounded boxes, the posterior arch is an arc of a tube, processes and ribs
are tubes along cubic Bezier curves, the iliac wings are curved shells with a crest tube, the
torso outline is an ellipse with random angular harmonics, the bowel and bone texture come
from up-sampled coarse noise fields, partial volume from averaged sub-slices and the noise
has a ramp-Gaussian spectrum. The anatomy the locator needs is the same
(``/work/shared/ANATOMY.md``): the vertebra count and order from the sacrum, ribs on the
thoracic vertebrae only, the iliac crest near L4, transitional variants (11/13 rib pairs,
4/6 lumbar vertebrae) with L3 counted from the last rib-bearing vertebra.

Style B is used only for validation and model choice, never for training. Its validation
seeds are :data:`VALIDATION_SEEDS`.

>>> from research.phantom_b import StyleBSpec, generate
>>> volume, truth = generate(3, StyleBSpec(fov="abdomen", size=96, pixel_mm=4.0))
>>> truth.l3_in_fov
True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from research.phantom_b.body import FOVS, Body, sample_body
from research.phantom_b.raster import SUB_STEP_MM, Grid, composite
from research.phantom_b.skeleton import build, torso_centre_y
from worker.mip import FrontalProjection, Mip
from worker.volume.load import CTVolume, PatientInfo

__all__ = [
    "FOVS",
    "THICKNESSES",
    "VALIDATION_SEEDS",
    "StyleBSpec",
    "TruthB",
    "generate",
    "generate_mips",
    "generate_truth",
    "validation_spec",
    "write_series",
]

#: Seeds reserved for validation and model choice on style B (issue 15). Nothing trains on
#: style B; the range is fixed so that every report uses the same phantoms.
VALIDATION_SEEDS = range(7_000_000, 7_010_000)

#: Slice thicknesses (mm) drawn when the spec leaves it open (ANATOMY.md: 0.6-5 mm).
THICKNESSES = (0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


@dataclass
class StyleBSpec:
    """What to generate; ``None`` fields are drawn from the seed.

    Attributes
    ----------
    fov : one of :data:`FOVS` ("chest", "abdomen", "abdomen_pelvis", "chest_abdomen_pelvis",
        "pelvis", "lumbar": a lumbar-spine window of 150-260 mm).
    slice_thickness_mm : contiguous slices (spacing = thickness), 0.6-5 mm when drawn.
    pixel_mm : in-plane pixel (mm); size : rows = cols.
    n_lumbar : 4, 5 or 6; n_rib_pairs : 11, 12 or 13 (None: drawn, 3 % each variant).
    arms : "down" or "up".
    noise_sd : image noise standard deviation (HU); None: drawn (4-50 HU).
    """

    fov: str | None = None
    slice_thickness_mm: float | None = None
    pixel_mm: float = 0.8
    size: int = 512
    n_lumbar: int | None = None
    n_rib_pairs: int | None = None
    arms: str | None = None
    noise_sd: float | None = None


@dataclass
class TruthB:
    """Ground truth of a style-B phantom in the volume's z (mm, patient superior).

    Attributes
    ----------
    seed, fov, style ("b").
    l3_in_fov : mid-L3 within the scanned z range.
    l3_mid_z_mm : midpoint of the L3 body's end plates (also when outside the scan).
    l3_mid_slice_index : nearest slice, or None when L3 is out of the field of view.
    vertebrae_z_mm : name -> (inferior, superior) end plate z, C3 .. L<m> and S1.
    rib_levels : names of the rib-bearing vertebrae (T1 .. Tn), from the top.
    landmarks_z_mm : iliac crest top, femoral head centre, diaphragm domes.
    variants : n_rib_pairs, n_lumbar, presacral count, transitional (None or a name).
    """

    seed: int
    fov: str
    l3_in_fov: bool
    l3_mid_z_mm: float
    l3_mid_slice_index: int | None
    vertebrae_z_mm: dict[str, tuple[float, float]]
    rib_levels: list[str]
    landmarks_z_mm: dict[str, float]
    variants: dict[str, Any]
    slice_thickness_mm: float
    pixel_mm: float
    patient: dict[str, Any] = field(default_factory=dict)
    style: str = "b"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict, floats rounded to 0.01 mm."""

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 2)
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean(asdict(self))


def _fov_range(body: Body, fov: str, rng: np.random.Generator) -> tuple[float, float]:
    """(bottom, top) z of the scan in the body frame (mm)."""
    u = rng.uniform
    t1, l1, l2, l3 = (body.level(n) for n in ("T1", "L1", "L2", "L3"))
    dome = max(body.dome_right, body.dome_left)
    fem = body.femoral_z
    if fov == "chest":
        return u(l2.zm, l1.z1 + 10.0), t1.z1 + u(15.0, 60.0)
    if fov == "abdomen":
        return u(fem + 10.0, body.crest_z - 20.0), dome + u(0.0, 40.0)
    if fov == "abdomen_pelvis":
        return fem - u(40.0, 110.0), dome + u(-10.0, 50.0)
    if fov == "chest_abdomen_pelvis":
        return fem - u(40.0, 110.0), t1.z1 + u(0.0, 50.0)
    if fov == "pelvis":
        low = body.levels[0]
        return fem - u(60.0, 140.0), min(u(low.zm, body.levels[1].z1), l3.z0 - 8.0)
    if fov == "lumbar":
        length = u(150.0, 260.0)
        centre = l3.zm + u(-50.0, 50.0)
        return centre - length / 2, centre + length / 2
    raise ValueError(f"unknown fov {fov!r}; expected one of {sorted(FOVS)}")


def _setup(seed: int, spec: StyleBSpec | None):
    spec = spec or StyleBSpec()
    if spec.pixel_mm <= 0 or spec.size < 8:
        raise ValueError("pixel_mm must be positive and size >= 8")
    rng = np.random.default_rng([seed, 0xB])
    fov = spec.fov or str(rng.choice(list(FOVS), p=list(FOVS.values())))
    if fov not in FOVS:
        raise ValueError(f"unknown fov {fov!r}; expected one of {sorted(FOVS)}")
    body = sample_body(
        seed, rng, n_lumbar=spec.n_lumbar, n_rib_pairs=spec.n_rib_pairs, arms=spec.arms
    )
    build(body, rng)
    if spec.noise_sd is not None:  # after every draw: the phantom is otherwise unchanged
        body.noise_sd = float(spec.noise_sd)
    bottom, top = _fov_range(body, fov, rng)
    thk = float(spec.slice_thickness_mm or rng.choice(THICKNESSES))
    if thk <= 0:
        raise ValueError("slice_thickness_mm must be positive")
    n = int(np.floor((top - bottom) / thk)) + 1
    if n < 2:
        raise ValueError(f"field of view {fov} gives fewer than 2 slices")
    n_sub = max(1, int(np.ceil(thk / SUB_STEP_MM)))
    zc = bottom + thk * np.arange(n)
    zs = (zc[:, None] + ((np.arange(n_sub) + 0.5) / n_sub - 0.5)[None, :] * thk).ravel()
    off_x, off_y = rng.uniform(-20.0, 20.0), rng.uniform(-15.0, 25.0)
    y_mid = float(torso_centre_y(body, body.level("L1").zm))
    half = (np.arange(spec.size) - (spec.size - 1) / 2) * spec.pixel_mm
    grid = Grid(half + off_x, half + y_mid + off_y, zs, spec.pixel_mm)
    z_off = round(float(rng.uniform(-300.0, 300.0)), 1)
    return spec, rng, fov, body, grid, zc, thk, n_sub, z_off


def _truth(
    seed: int, fov: str, body: Body, zc: np.ndarray, thk: float, px: float, z_off: float
) -> TruthB:
    z = zc + z_off
    verts = {lv.name: (lv.z0 + z_off, lv.z1 + z_off) for lv in reversed(body.levels)}
    verts["S1"] = (-25.0 * body.k + z_off, z_off)
    l3 = body.level("L3")
    mid = l3.zm + z_off
    in_fov = bool(z[0] <= mid <= z[-1])
    return TruthB(
        seed=seed,
        fov=fov,
        l3_in_fov=in_fov,
        l3_mid_z_mm=mid,
        l3_mid_slice_index=int(np.argmin(np.abs(z - mid))) if in_fov else None,
        vertebrae_z_mm=verts,
        rib_levels=sorted(
            {t.owner for t in body.tubes if t.kind == "rib"}, key=lambda n: int(n[1:])
        ),
        landmarks_z_mm={
            "iliac_crest_top": body.crest_z + z_off,
            "femoral_head_centre": body.femoral_z + z_off,
            "dome_right": body.dome_right + z_off,
            "dome_left": body.dome_left + z_off,
        },
        variants={
            "n_rib_pairs": body.n_rib_pairs,
            "n_lumbar": body.n_lumbar,
            "presacral": body.presacral,
            "transitional": body.transitional,
            "l3_convention": "third vertebra below the last rib-bearing one",
        },
        slice_thickness_mm=thk,
        pixel_mm=px,
        patient={
            "sex": body.sex,
            "height_m": round(body.height_m, 3),
            "weight_kg": round(body.weight_kg, 1),
            "arms": body.arms,
        },
    )


def generate(seed: int, spec: StyleBSpec | None = None) -> tuple[CTVolume, TruthB]:
    """A style-B CT phantom and its ground truth, deterministic for ``seed``.

    Parameters
    ----------
    seed : seeds the generator (``numpy.random.default_rng([seed, 0xB])``).
    spec : what to generate; unset fields are drawn.

    Returns
    -------
    volume : ``hu`` (z, y, x) float32 HU, z ascending (slice 0 most inferior), rows
        anterior -> posterior, columns patient right -> left (orientation 1,0,0,0,1,0).
        Memory: size^2 x extent / min(thickness, 1.25 mm) float32 while rendering.
    truth : :class:`TruthB`, z in the volume's z (mm).

    Raises
    ------
    ValueError
        Unknown fov, non-positive spacing, counts out of range.
    """
    spec, rng, fov, body, grid, zc, thk, n_sub, z_off = _setup(seed, spec)
    hu = composite(body, grid, rng, n_sub)
    z = (zc + z_off).astype(np.float64)
    volume = CTVolume(
        hu=hu,
        z_mm=z,
        pixel_spacing_mm=(spec.pixel_mm, spec.pixel_mm),
        image_position_first=(float(grid.xs[0]), float(grid.ys[0]), float(z[0])),
        patient=PatientInfo(
            patient_id=f"PB{seed:08d}",
            name=f"PHANTOM_B^{seed}",
            sex=body.sex,
            size_m=round(body.height_m, 2),
            weight_kg=round(body.weight_kg, 1),
        ),
        series_description=f"l3spot phantom style B {fov} seed {seed}",
        slice_thickness_mm=thk,
        manufacturer="l3spot phantom B",
        study_date="20240102",
    )
    return volume, _truth(seed, fov, body, zc, thk, spec.pixel_mm, z_off)


def generate_truth(seed: int, spec: StyleBSpec | None = None) -> TruthB:
    """The ground truth of ``generate(seed, spec)`` without rendering (milliseconds): to
    pick seeds by field of view or variant, or to check the anatomy."""
    spec, _, fov, body, _, zc, thk, _, z_off = _setup(seed, spec)
    return _truth(seed, fov, body, zc, thk, spec.pixel_mm, z_off)


def generate_mips(
    seed: int, spec: StyleBSpec | None, pixel_mms: tuple[float, ...]
) -> tuple[list[Mip], TruthB]:
    """Frontal MIPs (max over anterior-posterior) of ``generate(seed, spec)`` at several
    pixel sizes, from one projection (:class:`worker.mip.FrontalProjection`).

    Returns
    -------
    mips : one :class:`worker.mip.Mip` per entry of ``pixel_mms`` (head up).
    truth : as :func:`generate`.
    """
    volume, truth = generate(seed, spec)
    from worker.mip import frontal_projection

    proj: FrontalProjection = frontal_projection(volume)
    return [proj.resample(p) for p in pixel_mms], truth


def validation_spec(seed: int) -> StyleBSpec:
    """Low-resolution spec for locator validation: 2.5 mm pixels, an in-plane field of view
    of 340-500 mm, the fov and slice thickness (0.6-5 mm) drawn by the generator; the same
    resolution as the locator's style-A evaluation (``worker.training.locator.phantom_spec``).
    """
    rng = np.random.default_rng([seed, 0xB, 0x5])
    return StyleBSpec(pixel_mm=2.5, size=int(round(rng.uniform(340.0, 500.0) / 2.5)))


def at_pixel_size(spec: StyleBSpec, pixel_mm: float) -> StyleBSpec:
    """``spec`` rendered at ``pixel_mm`` (mm) instead, with the same in-plane field of view
    (``size`` x ``pixel_mm``, rounded to whole pixels). The anatomy is drawn from the seed,
    not from the grid, so the same seed gives the same patient.

    Raises
    ------
    ValueError
        ``pixel_mm`` is not positive.
    """
    if not pixel_mm > 0:
        raise ValueError(f"pixel size must be positive, got {pixel_mm!r} mm")
    size = int(round(spec.size * spec.pixel_mm / pixel_mm))
    return replace(spec, pixel_mm=float(pixel_mm), size=size)


def validation_mips(seed: int, pixel_mms: tuple[float, ...]) -> tuple[list[Mip], float | None]:
    """MIPs of the validation phantom of ``seed`` and its mid-L3 z (None: not in the FOV);
    the phantom source :func:`research.evaluate_locator.evaluate_phantoms` takes."""
    mips, truth = generate_mips(seed, validation_spec(seed), pixel_mms)
    return mips, (truth.l3_mid_z_mm if truth.l3_in_fov else None)


def write_series(volume: CTVolume, truth: TruthB, out_dir: Path) -> Path:
    """Write a CT Image Storage series (``out_dir/dicom``, UIDs from the seed, via
    :func:`worker.volume.write.write_ct_series`) and ``out_dir/ground_truth.json``.

    Returns
    -------
    Path
        The series folder.
    """
    from worker.volume.write import write_ct_series

    out_dir = Path(out_dir)
    series = out_dir / "dicom"
    written = write_ct_series(volume, series, uid_seed=f"l3spot-phantom-b-{truth.seed}")
    data = truth.to_json()
    data["series_instance_uid"] = written.series_instance_uid
    (out_dir / "ground_truth.json").write_text(json.dumps(data, indent=2) + "\n")
    return series
