"""Evaluation of the body-composition segmenters: Dice and area error per compartment.

References: (a) phantoms with exact masks (``worker.phantom`` when available, else the
synthetic L3 slice below), (b) the real TotalSegmentator references in
``abdomen_ct_totalseg`` (``tissue_types/`` on T11-L2, iliopsoas/autochthon at L3). Those are
anatomical model outputs with no HU threshold: they are compared raw and restricted to the
Mitsiopoulos HU ranges, which is what an L3 analysis measures.

Synthetic slice geometry (1 mm pixels by default): an elliptic trunk with subcutaneous fat,
a muscle ring with
a gap at the linea alba, paraspinal muscles, psoas beside a vertebra with a cortical rim,
kidneys, a liver tip against the right lateral wall, bowel loops with gas and oral contrast,
optionally arms beside or touching the trunk and a CT table below it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import labels as lab
from core.config import CompositionConfig
from worker.composition.hu import in_hu_range
from worker.composition.measure import segment_slice
from worker.volume.load import CTVolume

logger = logging.getLogger(__name__)

MUSCLE_HU = 45.0
FAT_HU = -100.0


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synthetic_l3(
    px: float = 1.0,
    *,
    arms: str = "none",
    table: bool = True,
    noise_hu: float = 8.0,
    seed: int = 0,
    liver: bool = True,
    metal: bool = False,
    truncate: bool = False,
    sat_mm: float = 23.0,
    muscle_hu: float = MUSCLE_HU,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A synthetic L3 slice with exact masks.

    Parameters
    ----------
    px : pixel spacing in mm (square pixels).
    arms : "none", "apart" (beside the trunk, not touching) or "touching".
    sat_mm : subcutaneous fat thickness (mm).
    muscle_hu : muscle radiodensity (HU).

    Returns
    -------
    (hu, labels, spacing) : (y, x) float32 HU (y anterior->posterior, x patient
    right->left), (y, x) uint8 exact labels (within the Mitsiopoulos HU ranges), (px, px) mm.
    """
    ny, nx = int(300 / px), int(420 / px)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64) * px
    cy, cx = 140.0, 210.0
    hu = np.full((ny, nx), -1000.0)
    labels = np.zeros((ny, nx), np.uint8)
    body = _ellipse(yy, xx, cy, cx, 92 + sat_mm, 127 + sat_mm)
    hu[body] = FAT_HU
    labels[body] = lab.SAT
    wall_out = _ellipse(yy, xx, cy, cx, 92, 127)
    wall_in = _ellipse(yy, xx, cy, cx, 80, 115)
    ring = wall_out & ~wall_in & ~((np.abs(xx - cx) < 4) & (yy < cy))  # linea alba gap
    cavity = wall_out
    hu[cavity] = FAT_HU
    labels[cavity] = lab.VAT
    muscle = ring.copy()
    # paraspinals (posterior, either side of the spinous process), psoas beside the body
    muscle |= _ellipse(yy, xx, cy + 62, cx - 28, 20, 22) | _ellipse(
        yy, xx, cy + 62, cx + 28, 20, 22
    )
    muscle |= _ellipse(yy, xx, cy + 22, cx - 35, 17, 15) | _ellipse(
        yy, xx, cy + 22, cx + 35, 17, 15
    )
    muscle &= cavity
    hu[muscle] = muscle_hu
    labels[muscle] = lab.SMA
    # IMAT: fat streaks inside the paraspinals
    imat = (
        _ellipse(yy, xx, cy + 62, cx - 30, 3, 5) | _ellipse(yy, xx, cy + 60, cx + 30, 3, 5)
    ) & muscle
    hu[imat] = FAT_HU
    labels[imat] = lab.IMAT
    # vertebra: body with cortex and osteoporotic cancellous bone, spinous process
    vb = _ellipse(yy, xx, cy + 20, cx, 16, 20)
    hu[vb] = 600.0
    hu[_ellipse(yy, xx, cy + 20, cx, 13, 17)] = 110.0  # cancellous bone in the muscle range
    spine = (np.abs(xx - cx) < 4) & (yy > cy + 36) & (yy < cy + 78)
    canal = _ellipse(yy, xx, cy + 44, cx, 7, 9)
    hu[spine] = 600.0
    hu[canal] = 15.0  # CSF
    lamina = _ellipse(yy, xx, cy + 44, cx, 11, 13) & ~canal
    hu[lamina] = 600.0
    labels[vb | spine | canal | lamina] = 0
    # kidneys (muscle-range HU, as unenhanced), separated from the psoas by perirenal fat
    for sx in (-1, 1):
        k = _ellipse(yy, xx, cy + 10, cx + sx * 80, 22, 14)
        hu[k] = 35.0
        labels[k] = 0
    # aorta / IVC in front of the vertebra
    for sx, r in ((1, 11), (-1, 10)):
        v = _ellipse(yy, xx, cy - 8, cx + sx * 14, r, r)
        hu[v] = 45.0
        labels[v] = 0
    # liver tip against the right lateral wall (patient right = low x)
    if liver:
        lv = _ellipse(yy, xx, cy - 10, cx - 90, 40, 28) & wall_in
        hu[lv] = 55.0
        labels[lv] = 0
    # bowel loops: wall, gas, oral contrast; one touches the anterior wall
    for by, bx, content in (
        (cy - 60, cx - 20, -1000.0),
        (cy - 45, cx + 45, 350.0),
        (cy - 20, cx + 75, -1000.0),
        (cy - 72, cx + 15, 300.0),
    ):
        outer = _ellipse(yy, xx, by, bx, 15, 15) & wall_in
        inner = _ellipse(yy, xx, by, bx, 11, 11)
        hu[outer] = 40.0
        hu[inner & outer] = content
        labels[outer] = 0
    if table:
        ty = cy + 92 + sat_mm + 7
        t = (yy > ty) & (yy < ty + 4) & (np.abs(xx - cx) < 190)
        hu[t] = 50.0
    if arms != "none":
        gap = 8.0 if arms == "apart" else -2.0
        for sx in (-1, 1):
            ax = cx + sx * (127 + sat_mm + gap + 40)
            arm = _ellipse(yy, xx, cy, ax, 45, 40)
            hu[arm] = FAT_HU
            hu[_ellipse(yy, xx, cy, ax, 33, 28)] = MUSCLE_HU
            hu[_ellipse(yy, xx, cy, ax, 9, 9)] = 700.0
            labels[arm & ~body] = 0
    if metal:
        m = _ellipse(yy, xx, cy + 20, cx + 10, 4, 4)
        hu[m] = 3000.0
        labels[m] = 0
    rng = np.random.default_rng(seed)
    hu = hu + rng.normal(0, noise_hu, hu.shape)
    # truth follows the HU ranges (Mitsiopoulos) like any threshold-defined reference
    labels[(labels == lab.SMA) & ~((hu >= -29) & (hu <= 150))] = 0
    fat_lab = np.isin(labels, (lab.VAT, lab.SAT, lab.IMAT))
    labels[fat_lab & ~((hu >= -190) & (hu <= -30))] = 0
    if truncate:
        keep = xx < cx + 140
        hu = hu[:, : int(keep[0].sum())]
        labels = labels[:, : hu.shape[1]]
    return hu.astype(np.float32), labels, (px, px)


def random_synthetic_l3(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """:func:`synthetic_l3` with pixel size, fat, muscle HU, noise and arms drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return synthetic_l3(
        float(rng.uniform(0.6, 1.0)),
        arms=str(rng.choice(["none", "none", "apart", "touching"])),
        noise_hu=float(rng.uniform(5, 20)),
        seed=seed,
        liver=bool(rng.random() < 0.7),
        sat_mm=float(rng.uniform(8, 40)),
        muscle_hu=float(rng.uniform(25, 60)),
    )


@dataclass
class Score:
    """Agreement of one compartment on one case: Dice and area error."""

    case: str
    compartment: str
    dice: float
    area_pred_cm2: float
    area_ref_cm2: float

    @property
    def area_error_cm2(self) -> float:
        return self.area_pred_cm2 - self.area_ref_cm2

    @property
    def area_error_pct(self) -> float:
        return (
            100.0 * self.area_error_cm2 / self.area_ref_cm2 if self.area_ref_cm2 else float("nan")
        )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A&B| / (|A|+|B|) of two boolean masks (1.0 when both are empty)."""
    s = float(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / s if s else 1.0


def score(case: str, name: str, pred: np.ndarray, ref: np.ndarray, pix_cm2: float) -> Score:
    """:class:`Score` of boolean masks ``pred`` vs ``ref`` with pixel area ``pix_cm2``."""
    return Score(case, name, dice(pred, ref), pred.sum() * pix_cm2, ref.sum() * pix_cm2)


def _phantom_slices(n: int, seed: int):
    """(name, hu, labels, spacing) of the L3 slices of ``n`` abdomen phantoms from ``seed``."""
    from worker.phantom import PhantomSpec, generate_phantom

    out = []
    for i in range(n):
        # abdomen FOV (L3 always inside), 5 mm slices for speed; the rest drawn from the seed
        ph = generate_phantom(seed + i, PhantomSpec(fov="abdomen", slice_thickness_mm=5.0))
        k = int(ph.truth.l3_mid_slice_index)
        sp = tuple(float(v) for v in ph.volume.pixel_spacing_mm)
        # copies, so the phantom volume is freed
        out.append((f"phantom{seed + i}", np.array(ph.volume.hu[k]), np.array(ph.labels[k]), sp))
    return out


def evaluate_phantoms(
    n: int, seed: int, config: CompositionConfig, *, synthetic: bool = False, device: str = "auto"
) -> tuple[str, list[Score]]:
    """Scores against exact masks on ``n`` phantoms (``worker.phantom``) or synthetic slices.

    Returns (source description, scores for SMA, IMAT, VAT, SAT of every case).
    """
    if synthetic:
        source = "synthetic L3 slices (research.evaluate_composition.random_synthetic_l3)"
        cases = [(f"synthetic{seed + i}", *random_synthetic_l3(seed + i)) for i in range(n)]
    else:
        source = "worker.phantom"
        cases = _phantom_slices(n, seed)
    scores: list[Score] = []
    for name, hu, truth, sp in cases:
        seg = segment_slice(hu, sp, config, device=device)
        pix = sp[0] * sp[1] / 100.0
        for v, key in lab.COMPARTMENTS.items():
            scores.append(score(name, key, seg.labels == v, truth == v, pix))
    return source, scores


def nifti_volume(path: Path) -> CTVolume:
    """A NIfTI CT or label map as a :class:`CTVolume` in the axial DICOM layout.

    :func:`worker.volume.load.load_nifti` with no slice minimum (reference label maps and the
    30-slice ``ct_sm.nii.gz`` crop are short); values as stored (HU or label values).
    """
    from worker.volume.load import load_nifti

    return load_nifti(path, min_slices=1, check_hu=False)


def nifti_array(path: Path) -> np.ndarray:
    """(z, y, x) array of a NIfTI file in the same layout as :func:`nifti_volume`."""
    return nifti_volume(path).hu


#: first slice of ``tissue_types/ct_sm.nii.gz`` inside ``ct.nii.gz`` (its affine is wrong)
CT_SM_FIRST_SLICE = 82
#: TotalSegmentator "total" labels at L3
L3_LABEL, PSOAS_LABELS, AUTOCHTHON_LABELS = 29, (88, 89), (86, 87)


def evaluate_real(
    root: Path, config: CompositionConfig, *, device: str = "auto"
) -> dict[str, list[Score]]:
    """Scores on the real case ``root/abdomen_ct_totalseg``.

    Returns
    -------
    dict with
    "tissue_types_raw": per slice of ``tissue_types`` (z 82..111, T11-L2), SMA vs
        skeletal_muscle, SAT vs subcutaneous_fat, VAT+IMAT vs torso_fat (TotalSegmentator's
        torso_fat is all non-subcutaneous fat of the trunk, intermuscular included);
    "tissue_types_hu": the same references restricted to the HU ranges of ``config``;
    "l3_psoas_paraspinal": at the L3 slices (vertebrae_L3 extent), SMA inside the
        iliopsoas/autochthon region (dilated by one pixel) vs those labels within the muscle
        HU range (the reference has no abdominal wall);
    "l3_psoas_paraspinal_oracle": the same score for every muscle-HU pixel of the scored
        region (the labels dilated by one pixel): what the labels' own anatomy with its rim
        counted by HU range scores (no segmentation);
    "tissue_types_ceiling": :func:`hu_range_ceiling`, what an HU-range method that agreed
        with the reference everywhere but its one-pixel rim would score (no segmentation).
    """
    base = Path(root) / "abdomen_ct_totalseg"
    vol = nifti_volume(base / "ct.nii.gz")
    sp = vol.pixel_spacing_mm
    pix = sp[0] * sp[1] / 100.0
    refs = {
        n: nifti_array(base / "tissue_types" / f"{n}.nii.gz") > 0
        for n in ("skeletal_muscle", "subcutaneous_fat", "torso_fat")
    }
    out: dict[str, list[Score]] = {"tissue_types_raw": [], "tissue_types_hu": []}
    musc_r = config.muscle_hu
    fat_r = config.fat_hu
    for i in range(refs["skeletal_muscle"].shape[0]):
        k = CT_SM_FIRST_SLICE + i
        hu = vol.hu[k]
        seg = segment_slice(hu, sp, config, device=device)
        L = seg.labels
        pairs = {
            "sma": (L == lab.SMA, refs["skeletal_muscle"][i], musc_r),
            "sat": (L == lab.SAT, refs["subcutaneous_fat"][i], fat_r),
            "vat+imat": (np.isin(L, (lab.VAT, lab.IMAT)), refs["torso_fat"][i], fat_r),
        }
        for key, (pred, ref, r) in pairs.items():
            out["tissue_types_raw"].append(score(f"z{k}", key, pred, ref, pix))
            out["tissue_types_hu"].append(score(f"z{k}", key, pred, ref & in_hu_range(hu, r), pix))
    seg_total = np.rint(nifti_array(base / "segmentation_total.nii.gz")).astype(np.int16)
    zs = np.flatnonzero((seg_total == L3_LABEL).any(axis=(1, 2)))
    from scipy import ndimage

    out["l3_psoas_paraspinal"] = []
    out["l3_psoas_paraspinal_oracle"] = []
    for k in zs:
        hu = vol.hu[k]
        region = np.isin(seg_total[k], PSOAS_LABELS + AUTOCHTHON_LABELS)
        ref = region & in_hu_range(hu, musc_r)
        seg = segment_slice(hu, sp, config, device=device)
        near = ndimage.binary_dilation(region)
        pred = (seg.labels == lab.SMA) & near
        out["l3_psoas_paraspinal"].append(score(f"z{k}", "sma", pred, ref, pix))
        # every muscle-HU pixel of the scored region: the labels' anatomy with their rim by HU
        oracle = in_hu_range(hu, musc_r) & near
        out["l3_psoas_paraspinal_oracle"].append(score(f"z{k}", "sma", oracle, ref, pix))
    out["tissue_types_ceiling"] = hu_range_ceiling(vol, refs, config)
    return out


def hu_range_ceiling(
    vol: CTVolume, refs: dict[str, np.ndarray], config: CompositionConfig
) -> list[Score]:
    """The score of an HU-range method with the reference's own anatomy (tissue_types masks).

    The references are anatomical (model output, no HU limits): at 3 mm pixels their border
    runs through the partial-volume rim that the Mitsiopoulos ranges count or not pixel by
    pixel. The "oracle" keeps the reference's pixels that lie in the HU range and adds the
    pixels in the HU range within one pixel of it (8-connected) that no other reference mask
    claims: ``in_hu_range(hu, range) & dilate(ref) & ~(other references)``. Its Dice and area
    error against the raw reference are the definitional gap between the two definitions, not
    a segmenter's error (round 8, docs/composition.md).

    Parameters
    ----------
    vol : the full CT (``ct.nii.gz``), (z, y, x) HU.
    refs : (30, y, x) bool masks "skeletal_muscle", "subcutaneous_fat", "torso_fat" of
        ``tissue_types`` (slice i is ``vol`` slice ``CT_SM_FIRST_SLICE + i``).
    config : the HU ranges.

    Returns
    -------
    One :class:`Score` per slice and compartment ("sma", "sat", "vat+imat").
    """
    from scipy import ndimage

    sp = vol.pixel_spacing_mm
    pix = sp[0] * sp[1] / 100.0
    ring = np.ones((3, 3), bool)
    pairs = (
        ("sma", "skeletal_muscle", config.muscle_hu),
        ("sat", "subcutaneous_fat", config.fat_hu),
        ("vat+imat", "torso_fat", config.fat_hu),
    )
    scores = []
    for i in range(refs["skeletal_muscle"].shape[0]):
        hu = vol.hu[CT_SM_FIRST_SLICE + i]
        for key, name, r in pairs:
            ref = refs[name][i]
            others = np.zeros_like(ref)
            for other in refs:
                if other != name:
                    others |= refs[other][i]
            oracle = in_hu_range(hu, r) & ndimage.binary_dilation(ref, structure=ring) & ~others
            scores.append(score(f"z{CT_SM_FIRST_SLICE + i}", key, oracle, ref, pix))
    return scores


def summarise(scores: list[Score]) -> list[tuple[str, int, float, float, float, float]]:
    """Per compartment: (name, n, mean Dice, SD Dice, mean |area error| cm^2, mean |error| %)."""
    rows = []
    for key in dict.fromkeys(s.compartment for s in scores):
        ss = [s for s in scores if s.compartment == key]
        d = np.array([s.dice for s in ss])
        e = np.array([abs(s.area_error_cm2) for s in ss])
        p = np.array([abs(s.area_error_pct) for s in ss if s.area_ref_cm2 > 0])
        rows.append(
            (
                key,
                len(ss),
                float(d.mean()),
                float(d.std()),
                float(e.mean()),
                float(p.mean()) if p.size else float("nan"),
            )
        )
    return rows


def format_summary(title: str, scores: list[Score]) -> str:
    """A plain-text table of :func:`summarise`."""
    lines = [title, f"{'compartment':<12}{'n':>4}{'Dice':>14}{'|err| cm2':>11}{'|err| %':>9}"]
    for key, n, dm, ds, e, p in summarise(scores):
        lines.append(f"{key:<12}{n:>4}{dm:>8.3f} ±{ds:.3f}{e:>11.2f}{p:>9.1f}")
    return "\n".join(lines)
