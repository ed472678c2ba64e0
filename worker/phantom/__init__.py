"""Synthetic CT phantoms with known anatomy: the training and test data of l3spot.

A phantom is a random patient (:mod:`worker.phantom.anatomy`: skeleton, soft-tissue
profiles, organs; sizes and HU from ``/work/shared/ANATOMY.md``) rasterised into a CT volume
(:mod:`worker.phantom.render`) with exact ground truth: every vertebra's z range, the L3
slice, tissue labels (SMA, IMAT, VAT, SAT; :mod:`core.labels`) at every slice and the
anatomical variants. L3 is counted from the top (the first non-rib-bearing vertebra is L1),
see :mod:`worker.phantom.anatomy`.

>>> from worker.phantom import PhantomSpec, generate_phantom
>>> ph = generate_phantom(7, PhantomSpec(fov="abdomen", rows=128, cols=128, pixel_spacing_mm=2.5))
>>> ph.truth.l3_in_fov
True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.mip import Mip, frontal_mip
from worker.phantom.anatomy import Anatomy, sample_body
from worker.phantom.render import RenderGrid, render
from worker.phantom.skeleton import build_skeleton
from worker.phantom.soft import build_soft
from worker.volume.load import CTVolume, PatientInfo

__all__ = [
    "FOVS",
    "GroundTruth",
    "Phantom",
    "PhantomMip",
    "PhantomSpec",
    "generate_phantom",
    "generate_phantom_mip",
    "generate_phantom_mips",
    "phantom_anatomy",
    "write_phantom",
]

#: Fields of view in z and their prior probabilities when drawn at random.
FOVS: dict[str, float] = {
    "abdomen_pelvis": 0.30,
    "chest_abdomen_pelvis": 0.25,
    "abdomen": 0.15,
    "whole_body": 0.15,
    "chest": 0.10,
    "pelvis": 0.05,
}

#: Slice thicknesses (mm) drawn when unspecified (common reconstructions).
THICKNESSES = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)

#: Largest random volume (voxels) before a drawn slice thickness is coarsened (~1 GB float32).
MAX_RANDOM_VOXELS = 250_000_000


@dataclass
class PhantomSpec:
    """What to generate; every ``None`` field is drawn at random from the seed.

    Attributes
    ----------
    fov : one of :data:`FOVS`.
    slice_thickness_mm : 0.6-5 mm; slices are contiguous (spacing = thickness) unless
        ``slice_spacing_mm`` is given.
    pixel_spacing_mm : in-plane pixel size (mm), realistic 0.6-1.0; any positive value works.
    rows, cols : image size (pixels).
    sex : "M" or "F"; height_m (m); weight_kg (kg).
    arms : "down" (beside the body), "up" (above the head) or "none".
    n_lumbar : 4, 5 or 6 lumbar vertebrae; n_rib_pairs : 11, 12 or 13.
    contrast : portal-venous contrast enhancement. noise_hu : noise standard deviation (HU).
    table : patient table present. metal : hip prosthesis or spinal hardware.
    with_labels : render the (z, y, x) tissue labels (skip for speed when only the image
        is needed).
    rectus_gap_mm : rectus diastasis: the two rectus abdominis muscles apart by this distance
        (mm, between their medial borders) in the anterior midline from the top of L1 down;
        0 = none (the muscle ring is closed). The gap holds fat continuous with the
        visceral fat and is labelled VAT (it lies inside the abdominal wall line). Normal
        linea alba width is up to 15-22 mm, diastasis above that (Beer et al. 2009;
        20-60 mm in docs/composition.md round 10). Never drawn at random: the default keeps
        every seed's phantom unchanged.
    linea_alba_mm : thickness (mm) of the fibrous linea alba closing that gap at the level
        of the muscles' outer surface (soft-tissue HU, drawn with the skin's class, label 0);
        0 = none visible (a 1-2 mm band at 3 mm pixels).
    site : a simulated site whose patients differ from the default population on purpose
        (:data:`SITES`), or None. Never drawn at random: the default keeps every seed's
        phantom unchanged; a site's own draws come from a separate generator of the seed.
    spine_variation : degenerative and osteoporotic variation of the vertebral column
        (:func:`worker.phantom.variation.apply_spine_variation`: body sizes, disc collapse,
        compression fracture, osteophytes), for domain randomisation (issue 15). Never drawn
        at random: the default keeps every seed's phantom unchanged.
    """

    fov: str | None = None
    slice_thickness_mm: float | None = None
    slice_spacing_mm: float | None = None
    pixel_spacing_mm: float | None = None
    rows: int = 512
    cols: int = 512
    sex: str | None = None
    height_m: float | None = None
    weight_kg: float | None = None
    arms: str | None = None
    n_lumbar: int | None = None
    n_rib_pairs: int | None = None
    contrast: bool | None = None
    noise_hu: float | None = None
    table: bool | None = None
    metal: bool | None = None
    with_labels: bool = True
    rectus_gap_mm: float = 0.0
    linea_alba_mm: float = 0.0
    site: str | None = None
    spine_variation: bool = False


#: Simulated sites (``PhantomSpec.site``): phantoms that differ from the training style in a
#: way a hospital's population can, to test that the locator learns from a site's corrections
#: (issue 17). ``"short_flank"``: the pelvis sits 35-55 mm higher on the lumbar spine and the
#: last two rib pairs sweep 2.2-2.8 times further down, so that the lower ribs reach towards
#: the iliac crests (the short costo-iliac distance of osteoporotic height loss and
#: hyperkyphosis, "costo-iliac impingement"); L3 is still the third vertebra below the last
#: rib-bearing one and the vertebrae are unchanged (ANATOMY.md).
SITES: tuple[str, ...] = ("short_flank",)


def apply_site(anat: Anatomy, site: str, seed: int) -> None:
    """Change a sampled body (before its skeleton is built) into a patient of ``site``.

    Parameters
    ----------
    anat : from :func:`worker.phantom.anatomy.sample_body`; changed in place (pelvis
        landmarks in mm, ``extra["lower_rib_drop_scale"]`` read by the skeleton).
    site : one of :data:`SITES`.
    seed : the phantom's seed; the site's draws use their own generator of it, so the
        phantom's other draws are those of the default population.

    Raises
    ------
    ValueError
        Unknown site.
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {list(SITES)}")
    rng = np.random.default_rng([seed, 0x517E])
    lift = float(rng.uniform(35.0, 55.0)) * anat.scale
    for key in ("iliac_crest_top", "femoral_head_centre", "perineum", "knee"):
        anat.landmarks[key] += lift
    anat.extra["lower_rib_drop_scale"] = float(rng.uniform(2.2, 2.8))
    anat.variants["site"] = site
    anat.variants["pelvis_lift_mm"] = round(lift, 1)


@dataclass
class GroundTruth:
    """What is known about a phantom, in the volume's z (mm, along the slice normal).

    Attributes
    ----------
    seed, fov : how it was made.
    l3_in_fov : mid-L3 lies within the scanned z range.
    l3_z_range_mm : (inferior end plate z, superior end plate z) of the L3 body.
    l3_mid_z_mm : midpoint of that range; l3_mid_slice_index : nearest slice (None if out).
    vertebrae_z_mm : name ("C1".."C7", "T1".."Tn", "L1".."Lm", "S1") -> (bottom, top) of the
        vertebral body in mm, for every level even outside the field of view.
    landmarks_z_mm : iliac crest top, femoral head centre, diaphragm domes, ... (mm).
    variants : ``n_lumbar``, ``n_rib_pairs``, ``n_presacral``, ``transitional`` (None or a
        name such as "thoracolumbar_13_ribs", "sacralisation"), ``l3_convention`` and the
        habitus flags.
    patient : sex, height, weight, age, arms, BMI.
    """

    seed: int
    fov: str
    l3_in_fov: bool
    l3_z_range_mm: tuple[float, float] | None
    l3_mid_z_mm: float | None
    l3_mid_slice_index: int | None
    vertebrae_z_mm: dict[str, tuple[float, float]]
    variants: dict[str, object]
    landmarks_z_mm: dict[str, float] = field(default_factory=dict)
    patient: dict[str, object] = field(default_factory=dict)
    slice_thickness_mm: float = 0.0
    pixel_spacing_mm: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists, floats rounded to 0.01 mm)."""
        d = asdict(self)

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 2)
            if isinstance(v, (tuple, list)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, np.generic):
                return clean(v.item())
            return v

        return clean(d)


@dataclass
class Phantom:
    """A rendered phantom.

    Attributes
    ----------
    volume : CT volume, ``hu`` (z, y, x) float32, z ascending, rows anterior -> posterior,
        columns patient right -> left; patient info filled (name ``PHANTOM^<seed>``).
    labels : (z, y, x) uint8 tissue labels (core.labels: SMA, IMAT, VAT, SAT, 0 elsewhere;
        bone, organs, bowel, arms are 0), or an empty (0, 0, 0) array when not rendered.
    truth : ground truth.
    anatomy : the sampled patient (for inspection and tests).
    """

    volume: CTVolume
    labels: np.ndarray
    truth: GroundTruth
    anatomy: Anatomy | None = None


@dataclass
class PhantomMip:
    """The frontal MIP of a phantom and its ground truth (see :func:`generate_phantom_mip`)."""

    mip: Mip
    truth: GroundTruth


def _fov_range(anat: Anatomy, fov: str, rng: np.random.Generator) -> tuple[float, float]:
    """(bottom, top) z of the scan in the body frame (mm) for a field-of-view type."""
    v = {x.name: x for x in anat.vertebrae}
    lm = anat.landmarks
    u = rng.uniform
    l3 = v["L3"]
    if fov == "chest":
        top = v["T1"].z1 + u(20, 60)
        bottom = u(max(v["L2"].z0, l3.z1 + 5), v["L1"].z1)
    elif fov == "abdomen":
        top = anat.dome["right"] + u(0, 40)
        bottom = u(lm["femoral_head_centre"] + 30, lm["iliac_crest_top"] - 10)
    elif fov == "abdomen_pelvis":
        top = anat.dome["right"] + u(0, 45)
        bottom = lm["femoral_head_centre"] - u(50, 120)
    elif fov == "chest_abdomen_pelvis":
        top = v["T1"].z1 + u(10, 60)
        bottom = lm["femoral_head_centre"] - u(50, 120)
    elif fov == "whole_body":
        top = u(lm["skull_base"], lm["vertex"] + 10)
        bottom = u(lm["knee"] + 40, lm["femoral_head_centre"] - 200)
    elif fov == "pelvis":
        top = u(v["L5"].z1 if "L5" in v else l3.z0 - 30, l3.z0 - 5)
        top = min(top, l3.z0 - 5)
        bottom = lm["femoral_head_centre"] - u(60, 150)
    else:
        raise ValueError(f"unknown fov {fov!r}; expected one of {sorted(FOVS)}")
    return float(bottom), float(top)


def sample_anatomy(
    seed: int,
    rng: np.random.Generator,
    *,
    table: bool | None = None,
    site: str | None = None,
    spine_variation: bool = False,
    **fixed: Any,
) -> Anatomy:
    """Draw a random patient: :func:`~worker.phantom.anatomy.sample_body`, then its skeleton
    (:mod:`worker.phantom.skeleton`) and soft tissues (:mod:`worker.phantom.soft`).

    Parameters
    ----------
    seed : recorded in the result (the randomness comes from ``rng``).
    rng : numpy Generator; the only source of randomness (deterministic for a seed).
    table : the CT table drawn or not (None: drawn at random).
    site : a simulated site (:func:`apply_site`), or None for the default population.
    spine_variation : vary the vertebral column (:mod:`worker.phantom.variation`).
    **fixed : ``sex``, ``height_m``, ``weight_kg``, ``arms``, ``n_lumbar``, ``n_rib_pairs``,
        ``contrast``, ``noise_hu``, ``metal``: fixed values, or None to draw them.

    Returns
    -------
    Anatomy
        Skeleton, soft-tissue profiles, organs and the HU of every tissue class.

    Notes
    -----
    Composed here rather than in :mod:`~worker.phantom.anatomy` so that the skeleton and
    soft-tissue modules, which import the anatomy's types, are not imported back by it (no
    import cycle).
    """
    anat = sample_body(seed, rng, **fixed)
    if site is not None:
        apply_site(anat, site, seed)
    if spine_variation:
        from worker.phantom.variation import apply_spine_variation

        apply_spine_variation(anat, seed)
    build_skeleton(anat, rng)
    build_soft(anat, rng, table=table, metal="metal_kind" in anat.extra)
    return anat


def _build(seed: int, spec: PhantomSpec | None):
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(seed)
    fov = spec.fov or str(rng.choice(list(FOVS), p=list(FOVS.values())))
    if fov not in FOVS:
        raise ValueError(f"unknown fov {fov!r}; expected one of {sorted(FOVS)}")
    anat = sample_anatomy(
        seed,
        rng,
        sex=spec.sex,
        height_m=spec.height_m,
        weight_kg=spec.weight_kg,
        arms=spec.arms,
        n_lumbar=spec.n_lumbar,
        n_rib_pairs=spec.n_rib_pairs,
        contrast=spec.contrast,
        noise_hu=spec.noise_hu,
        table=spec.table,
        metal=spec.metal,
        site=spec.site,
        spine_variation=spec.spine_variation,
    )
    if spec.rectus_gap_mm < 0 or spec.linea_alba_mm < 0:
        raise ValueError("rectus_gap_mm and linea_alba_mm must be >= 0")
    if spec.rectus_gap_mm > 0:  # fixed by the spec, no random draw: other phantoms unchanged
        anat.extra["rectus_gap_mm"] = float(spec.rectus_gap_mm)
        anat.extra["linea_alba_mm"] = float(spec.linea_alba_mm)
        anat.variants["rectus_diastasis_mm"] = float(spec.rectus_gap_mm)
    bottom, top = _fov_range(anat, fov, rng)
    px = float(spec.pixel_spacing_mm or rng.uniform(0.6, 1.0))
    if px <= 0 or spec.rows < 8 or spec.cols < 8:
        raise ValueError("pixel_spacing_mm must be positive and rows, cols >= 8")
    drawn = spec.slice_thickness_mm is None
    thk = float(spec.slice_thickness_mm or rng.choice(THICKNESSES))
    if thk <= 0:
        raise ValueError("slice_thickness_mm must be positive")
    step = float(spec.slice_spacing_mm or thk)
    while drawn and (top - bottom) / step * spec.rows * spec.cols > MAX_RANDOM_VOXELS:
        thk = step = step * 2
    n = int(np.floor((top - bottom) / step)) + 1
    if n < 2:
        raise ValueError(f"field of view {fov} gives fewer than 2 slices")
    zs = bottom + step * np.arange(n)
    # in-plane placement: isocentre near the torso centre at L1, patient a little off-centre
    sec = __import__("worker.phantom.anatomy", fromlist=["torso_section"]).torso_section(
        anat, anat.vertebra("L1").zm
    )
    y_mid = sec["yc"] + 0.5 * (sec["b_op"] - sec["b_oa"])
    off_x, off_y = rng.uniform(-25, 25), rng.uniform(-20, 30)
    xs = (np.arange(spec.cols) - (spec.cols - 1) / 2) * px + off_x
    ys = (np.arange(spec.rows) - (spec.rows - 1) / 2) * px + y_mid + off_y
    z_off = float(np.round(rng.uniform(-400.0, 100.0) - bottom, 1))
    grid = RenderGrid(xs, ys, zs, px, thk)
    return spec, rng, fov, anat, grid, (off_x, y_mid + off_y, z_off)


def phantom_anatomy(
    seed: int, spec: PhantomSpec | None = None
) -> tuple[Anatomy, np.random.Generator]:
    """The anatomy of phantom ``seed`` without rendering it, for renders of one's own grid
    (the level-verification boxes of :mod:`worker.phantom.spine_box`).

    Returns
    -------
    (anatomy, rng): the anatomy :func:`generate_phantom` would render for the same seed and
    spec, and the phantom's random stream after every draw of the build (a render that
    continues it draws noise and texture as the phantom's own render would).

    Raises
    ------
    ValueError
        An unknown field of view or an invalid spec (as :func:`generate_phantom`).
    """
    _, rng, _, anat, _, _ = _build(seed, spec)
    return anat, rng


def _truth(seed: int, fov: str, anat: Anatomy, grid: RenderGrid, z_off: float) -> GroundTruth:
    zs = grid.zs + z_off
    verts = {v.name: (v.z0 + z_off, v.z1 + z_off) for v in anat.vertebrae}
    verts["S1"] = (-21.0 * anat.scale + z_off, z_off)
    l3 = verts["L3"]
    mid = 0.5 * (l3[0] + l3[1])
    in_fov = bool(zs[0] <= mid <= zs[-1])
    return GroundTruth(
        seed=seed,
        fov=fov,
        l3_in_fov=in_fov,
        l3_z_range_mm=l3,
        l3_mid_z_mm=mid,
        l3_mid_slice_index=int(np.argmin(np.abs(zs - mid))) if in_fov else None,
        vertebrae_z_mm=verts,
        variants=dict(anat.variants),
        landmarks_z_mm={k: v + z_off for k, v in anat.landmarks.items()},
        patient={
            "sex": anat.sex,
            "height_m": round(anat.height_m, 3),
            "weight_kg": round(anat.weight_kg, 1),
            "bmi": round(anat.weight_kg / anat.height_m**2, 1),
            "age": anat.age,
            "arms": anat.arms,
        },
        slice_thickness_mm=grid.thickness_mm,
        pixel_spacing_mm=grid.pixel_mm,
    )


def generate_phantom(seed: int, spec: PhantomSpec | None = None) -> Phantom:
    """Generate a CT phantom with known anatomy, deterministically for ``seed``.

    Parameters
    ----------
    seed : seed of the numpy Generator that draws everything not fixed by ``spec``.
    spec : what to generate (fields left None are drawn at random).

    Returns
    -------
    Phantom
        ``volume.hu`` (z, y, x) float32 HU with z ascending (slice 0 most inferior), rows
        anterior -> posterior, columns patient right -> left, Image Orientation (1,0,0,0,1,0);
        ``labels`` (z, y, x) uint8; ``truth`` in the volume's z (mm).

    Raises
    ------
    ValueError
        An invalid spec (unknown fov, non-positive spacing, n_lumbar not 4-6, ...).
    """
    spec, rng, fov, anat, grid, (off_x, off_y, z_off) = _build(seed, spec)
    hu, lab = render(anat, grid, rng, with_labels=spec.with_labels)
    px = grid.pixel_mm
    # patient coordinates (LPS, mm) of pixel (0, 0): body frame minus the centring offsets
    x0 = float(grid.xs[0] - off_x)
    y0 = float(grid.ys[0] - off_y)
    zs = grid.zs + z_off
    truth = _truth(seed, fov, anat, grid, z_off)
    volume = CTVolume(
        hu=hu,
        z_mm=zs.astype(np.float64),
        pixel_spacing_mm=(px, px),
        image_position_first=(x0, y0, float(zs[0])),
        patient=PatientInfo(
            patient_id=f"PH{seed:08d}",
            name=f"PHANTOM^{seed}",
            sex=anat.sex,
            age=f"{anat.age:03d}Y",
            size_m=round(anat.height_m, 2),
            weight_kg=round(anat.weight_kg, 1),
        ),
        series_description=f"l3spot phantom {fov} seed {seed}",
        slice_thickness_mm=grid.thickness_mm,
        manufacturer="l3spot phantom",
        study_date="20240101",
    )
    labels = lab if lab is not None else np.zeros((0, 0, 0), dtype=np.uint8)
    return Phantom(volume=volume, labels=labels, truth=truth, anatomy=anat)


def generate_phantom_mip(
    seed: int, spec: PhantomSpec | None = None, pixel_mm: float = 2.0
) -> PhantomMip:
    """The frontal MIP of the phantom ``generate_phantom(seed, spec)``, without the volume.

    Renders slice by slice and keeps only the maximum over the anterior-posterior axis, so
    memory stays small and no labels are made: the fast path for training the L3 locator.
    The result equals ``frontal_mip(generate_phantom(seed, spec).volume, pixel_mm)`` (same
    random draws).

    Parameters
    ----------
    seed, spec : as :func:`generate_phantom`.
    pixel_mm : MIP pixel size (mm), see :func:`worker.mip.frontal_mip`.

    Returns
    -------
    PhantomMip
        ``mip`` (rows, cols) with head up, and the ground truth.
    """
    return generate_phantom_mips(seed, spec, (pixel_mm,))[0]


def generate_phantom_mips(
    seed: int, spec: PhantomSpec | None, pixel_mms: tuple[float, ...]
) -> list[PhantomMip]:
    """Frontal MIPs of one phantom at several pixel sizes, rendered once.

    The two-stage locator needs the coarse (3 mm) and the fine (1 mm) MIP of the same scan;
    rendering dominates the cost, so both come from one anterior-posterior projection. Each
    MIP equals :func:`generate_phantom_mip` at that pixel size.

    Parameters
    ----------
    seed, spec : as :func:`generate_phantom`.
    pixel_mms : MIP pixel sizes (mm), one output per entry, in order.

    Returns
    -------
    list[PhantomMip]
        One per pixel size; they share the ground truth.
    """
    spec, rng, fov, anat, grid, (_, _, z_off) = _build(seed, spec)
    proj, _ = render(anat, grid, rng, with_labels=False, mip_only=True)
    zs = grid.zs + z_off
    vol = CTVolume(hu=proj, z_mm=zs, pixel_spacing_mm=(grid.pixel_mm, grid.pixel_mm))
    truth = _truth(seed, fov, anat, grid, z_off)
    return [PhantomMip(mip=frontal_mip(vol, px), truth=truth) for px in pixel_mms]


def write_phantom(phantom: Phantom, out_dir: Path, fmt: str = "dicom") -> Path:
    """Write a phantom and its ``ground_truth.json``.

    Parameters
    ----------
    phantom : from :func:`generate_phantom`.
    out_dir : output folder (created). ``dicom``: a CT Image Storage series in
        ``out_dir/dicom/`` (one file per slice, via :func:`worker.volume.write.write_ct_series`,
        UIDs deterministic from the seed); ``nifti``: ``ct.nii.gz`` (int16 HU) and
        ``labels.nii.gz`` (uint8) in RAS+ orientation, as TotalSegmentator writes them.
    fmt : "dicom" or "nifti".

    Returns
    -------
    Path
        The series folder (dicom) or the ``ct.nii.gz`` file (nifti).

    Raises
    ------
    ValueError
        Unknown ``fmt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = phantom.truth.to_json()
    if fmt == "dicom":
        from worker.volume.write import write_ct_series

        series_dir = out_dir / "dicom"
        written = write_ct_series(
            phantom.volume,
            series_dir,
            uid_seed=f"l3spot-phantom-{phantom.truth.seed}",
            series_description=phantom.volume.series_description,
        )
        truth["series_instance_uid"] = written.series_instance_uid
        truth["study_instance_uid"] = written.study_instance_uid
        result = series_dir
    elif fmt == "nifti":
        import nibabel as nib

        vol = phantom.volume
        dy, dx = vol.pixel_spacing_mm
        dz = vol.slice_spacing_mm
        x0, y0, z0 = vol.image_position_first
        # array (z, y, x) in LPS -> NIfTI (i, j, k) = (x, y, z) flipped to RAS
        arr = np.transpose(np.clip(np.rint(vol.hu), -1024, 3071).astype(np.int16), (2, 1, 0))
        arr = arr[::-1, ::-1, :]
        nx, ny = arr.shape[0], arr.shape[1]
        affine = np.array(
            [
                [dx, 0, 0, -(x0 + (nx - 1) * dx)],
                [0, dy, 0, -(y0 + (ny - 1) * dy)],
                [0, 0, dz, z0],
                [0, 0, 0, 1],
            ]
        )
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), out_dir / "ct.nii.gz")
        if phantom.labels.size:
            la = np.transpose(phantom.labels, (2, 1, 0))[::-1, ::-1, :]
            nib.save(nib.Nifti1Image(np.ascontiguousarray(la), affine), out_dir / "labels.nii.gz")
        result = out_dir / "ct.nii.gz"
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'dicom' or 'nifti'")
    (out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=2))
    return result
