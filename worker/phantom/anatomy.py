"""Sampling a random patient: skeleton, soft-tissue profiles, organs, table.

All positions are in the body frame (mm): x = patient right -> left (0 = midline),
y = anterior -> posterior, z = inferior -> superior with z = 0 at the superior end plate of S1.
Sizes and HU follow ``/work/shared/ANATOMY.md`` (typical adult ranges from standard anatomy
and radiology references), each drawn at random around its typical value.

Vertebrae are named by counting from the top, as radiologists do (ANATOMY.md): C1..C7, then
every rib-bearing vertebra is thoracic (T1..Tn, n = number of rib pairs), the first vertebra
without ribs is L1, and the presacral vertebrae below are L2..Lm. L3 is therefore the third
vertebra below the last rib-bearing one, whatever the transitional anatomy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from worker.phantom.primitives import Capsule, Ellipsoid, Slab

# --- tissue classes of the soft-tissue class map ------------------------------------------
AIR = 0
SKIN = 1
SAT = 2
MUSCLE = 3
IMAT = 4
VAT = 5
LIVER = 6
SPLEEN = 7
KIDNEY = 8
BOWEL_WALL = 9
GAS = 10
CONTRAST = 11
FLUID = 12
BLOOD = 13
LUNG = 14
BLADDER = 15
TABLE_SHELL = 16
TABLE_CORE = 17
BRAIN = 18
FECES = 19
ARM_FAT = 20
ARM_MUSCLE = 21
HEART = 22
PAD = 23
KIDNEY_MEDULLA = 24
CSF = 25
N_CLASSES = 26

#: Fraction of patients with a thoracolumbar / lumbosacral transitional vertebra: seed "A fully
#: automatic deep learning system for L3 slice selection" (ANATOMY.md): 4-5 % / 5-7 %.
P_THORACOLUMBAR = 0.05
P_LUMBOSACRAL = 0.06

#: Lumbar transverse-process half span (tip to midline, mm), L1..L6 (ANATOMY.md: tip to tip
#: L1 ~ 70, L3 ~ 90-100 (longest), L5 ~ 85).
LUMBAR_TP_HALF = (35.0, 42.0, 48.0, 45.0, 42.5, 40.0)


@dataclass
class Vertebra:
    """One vertebral body (body frame, mm)."""

    name: str
    z0: float  # inferior end plate
    z1: float  # superior end plate
    cx: float
    cy: float
    width: float
    depth: float
    rib: bool
    region: str  # "C", "T", "L"

    @property
    def zm(self) -> float:
        return 0.5 * (self.z0 + self.z1)


@dataclass
class Profile:
    """Piecewise-linear function of z from control points."""

    z: np.ndarray
    v: np.ndarray

    @classmethod
    def of(cls, points: list[tuple[float, float]]) -> Profile:
        pts = sorted(points)
        return cls(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))

    def __call__(self, z: float) -> float:
        return float(np.interp(z, self.z, self.v))


@dataclass
class SoftPart:
    """A soft-tissue shape drawn into the class map (``clip``: only inside this region)."""

    shape: Capsule | Ellipsoid | Slab
    cls: int
    clip: str | None = None  # None | "cavity" | "abdomen" | "outside"


@dataclass
class Anatomy:
    """A sampled patient. See the module docstring for the frame and naming convention."""

    seed: int
    sex: str
    height_m: float
    weight_kg: float
    age: int
    scale: float
    hu: np.ndarray  # (N_CLASSES,) float32 HU per tissue class
    vertebrae: list[Vertebra]
    variants: dict[str, object]
    landmarks: dict[str, float]
    spine_x: Callable[[float], float]
    spine_y: Callable[[float], float]
    prof: dict[str, Profile]
    bones: list[object]
    soft_before: list[SoftPart]  # drawn before the torso (arms, thighs, breasts, head, neck)
    soft_after: list[SoftPart]  # organs inside the torso
    table: dict[str, float] | None
    dome: dict[str, float]
    imat_fraction: float
    noise_hu: float
    z_bottom: float  # lowest modelled z (knees)
    z_top: float  # vertex (or hands above the head)
    arms: str
    extra: dict[str, object] = field(default_factory=dict)

    def vertebra(self, name: str) -> Vertebra:
        for v in self.vertebrae:
            if v.name == name:
                return v
        raise KeyError(name)

    def last_rib_vertebra(self) -> Vertebra:
        """The lowest rib-bearing vertebra (``vertebrae`` run from the bottom up)."""
        return [v for v in self.vertebrae if v.rib][0]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _bump(z: float, centre: float, width: float) -> float:
    return float(np.exp(-0.5 * ((z - centre) / width) ** 2))


def _spine_levels(
    rng: np.random.Generator, n_rib: int, n_lumbar: int, k: float, kw: float
) -> tuple[list[Vertebra], dict[str, tuple[float, float]]]:
    """Vertebral bodies stacked from the top of S1 (z = 0) upwards, heights/widths in mm.

    Heights (ANATOMY.md): lumbar body 25-30 (L1 smallest), discs 8-12; thoracic body 15-25
    increasing downwards, discs 3-6; cervical ~14, discs ~5.
    """
    names: list[tuple[str, str, bool]] = []
    for i in range(n_lumbar, 0, -1):
        names.append((f"L{i}", "L", False))
    for i in range(n_rib, 0, -1):
        names.append((f"T{i}", "T", True))
    for i in range(7, 0, -1):
        names.append((f"C{i}", "C", False))
    out: list[Vertebra] = []
    discs: dict[str, tuple[float, float]] = {}
    z = 0.0
    for name, region, rib in names:
        idx = int(name[1:])
        if region == "L":
            # rank from the top, 0 = L1, so that L1 is smallest and the lowest largest
            h = (25.0 + 4.0 * (idx - 1) / max(n_lumbar - 1, 1)) * _u(rng, 0.93, 1.07)
            disc = _u(rng, 8.0, 12.0)
            w = 40.0 + 10.0 * (idx - 1) / max(n_lumbar - 1, 1)
            d = 30.0 + 5.0 * (idx - 1) / max(n_lumbar - 1, 1)
        elif region == "T":
            f = (idx - 1) / max(n_rib - 1, 1)
            h = (15.5 + 8.0 * f) * _u(rng, 0.93, 1.07)
            disc = 3.0 + 3.0 * f * _u(rng, 0.7, 1.1)
            w = 25.0 + 13.0 * f
            d = 16.0 + 13.0 * f
        else:
            h = 14.0 if idx > 2 else (30.0 if idx == 2 else 10.0)
            h *= _u(rng, 0.93, 1.07)
            disc = 4.5 if idx > 1 else 1.0
            w, d = 20.0, 15.0
        h *= k
        disc *= k
        discs[name] = (z, z + disc)
        out.append(Vertebra(name, z + disc, z + disc + h, 0.0, 0.0, w * kw, d * kw, rib, region))
        z += disc + h
    return out, discs


def sample_body(
    seed: int,
    rng: np.random.Generator,
    *,
    sex: str | None = None,
    height_m: float | None = None,
    weight_kg: float | None = None,
    arms: str | None = None,
    n_lumbar: int | None = None,
    n_rib_pairs: int | None = None,
    contrast: bool | None = None,
    noise_hu: float | None = None,
    metal: bool | None = None,
) -> Anatomy:
    """Draw a random patient's proportions, landmarks and tissue HU, without the primitives.

    The skeleton's and the soft tissues' primitives are added by
    :func:`worker.phantom.sample_anatomy`, which calls this first (the order of draws from
    ``rng`` is the same as when one function did both).

    Parameters
    ----------
    seed : recorded in the result (the randomness comes from ``rng``).
    rng : numpy Generator; the only source of randomness (deterministic for a seed).
    sex, height_m, weight_kg, arms, n_lumbar, n_rib_pairs, contrast, noise_hu, metal :
        fixed values, or None to draw them.

    Returns
    -------
    Anatomy
        Vertebrae, landmarks, soft-tissue profiles and the HU of every tissue class; the
        metal variant resolved (``extra["metal_kind"]`` present when there is metal);
        ``bones``, ``soft_before`` and ``soft_after`` still empty.
    """
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    male = sex == "M"
    if height_m is None:
        height_m = float(np.clip(rng.normal(1.76 if male else 1.63, 0.07), 1.45, 2.0))
    if weight_kg is None:
        bmi = float(np.clip(rng.lognormal(np.log(26.0), 0.22), 15.0, 50.0))
        weight_kg = bmi * height_m**2
    bmi = weight_kg / height_m**2
    age = int(np.clip(rng.normal(60, 14), 18, 95))
    k = height_m / 1.72 * _u(rng, 0.96, 1.04)  # longitudinal scale
    kw = (1.0 if male else 0.92) * (height_m / 1.72) ** 0.5 * _u(rng, 0.94, 1.06)  # width scale
    arms = arms or str(rng.choice(["down", "up", "none"], p=[0.45, 0.45, 0.10]))

    # --- transitional anatomy: counted from the top (module docstring)
    transitional: str | None = None
    if n_rib_pairs is None:
        r = rng.random()
        n_rib_pairs = 12
        if r < P_THORACOLUMBAR / 2:
            n_rib_pairs, transitional = 11, "thoracolumbar_11_ribs"
        elif r < P_THORACOLUMBAR:
            n_rib_pairs, transitional = 13, "thoracolumbar_13_ribs"
    elif n_rib_pairs != 12:
        transitional = f"thoracolumbar_{n_rib_pairs}_ribs"
    if n_lumbar is None:
        # 24 presacral vertebrae; a lumbosacral transition shifts the count by one
        n_lumbar = 24 - 7 - n_rib_pairs
        r = rng.random()
        if r < P_LUMBOSACRAL / 2:
            n_lumbar -= 1
            transitional = (transitional + "+" if transitional else "") + "sacralisation"
        elif r < P_LUMBOSACRAL:
            n_lumbar += 1
            transitional = (transitional + "+" if transitional else "") + "lumbarisation"
        n_lumbar = int(np.clip(n_lumbar, 4, 6))
    elif n_lumbar != 24 - 7 - n_rib_pairs:
        kind = "sacralisation" if n_lumbar < 24 - 7 - n_rib_pairs else "lumbarisation"
        transitional = (transitional + "+" if transitional else "") + kind
    if n_lumbar not in (4, 5, 6) or n_rib_pairs not in (11, 12, 13):
        raise ValueError(
            f"n_lumbar must be 4-6 and n_rib_pairs 11-13, got {n_lumbar}, {n_rib_pairs}"
        )

    verts, discs = _spine_levels(rng, n_rib_pairs, n_lumbar, k, kw)
    vz = {v.name: v for v in verts}
    l3 = vz["L3"]
    lowest = verts[0]  # lowest presacral vertebra

    # --- spinal curves: lordosis (lumbar anterior), kyphosis (thoracic posterior), scoliosis
    z_t7 = vz.get("T7", verts[-8]).zm
    z_c4 = vz["C4"].zm
    lord = _u(rng, 8.0, 22.0) * k
    kyph = _u(rng, 10.0, 30.0) * k
    cerv = _u(rng, 0.0, 12.0) * k
    scol_amp = float(rng.choice([0.0, _u(rng, 2.0, 8.0), _u(rng, 8.0, 22.0)], p=[0.3, 0.5, 0.2]))
    scol_len = _u(rng, 300.0, 550.0) * k
    scol_ph = _u(rng, 0.0, 2 * np.pi)
    sac_tilt = _u(rng, 0.45, 0.8)

    def spine_y(z: float) -> float:
        if z < 0:
            return -lord * _bump(0.0, l3.zm, 110 * k) + sac_tilt * (-z)
        return (
            -lord * _bump(z, l3.zm, 110 * k)
            + kyph * _bump(z, z_t7, 130 * k)
            - cerv * _bump(z, z_c4, 50 * k)
        )

    def spine_x(z: float) -> float:
        if z <= 0:
            return 0.0
        ramp = min(1.0, z / (80.0 * k))
        return scol_amp * ramp * float(
            np.sin(2 * np.pi * z / scol_len + scol_ph)
        ) - scol_amp * ramp * float(np.sin(scol_ph)) * _bump(z, 0.0, 200 * k)

    for v in verts:
        v.cx, v.cy = spine_x(v.zm), spine_y(v.zm)

    # --- pelvis landmarks (ANATOMY.md): crest top at the L4 body / L4-L5 disc in most adults,
    # at L3-L4 in a minority, lower in tall people; femoral head 80-110 (up to 125) below it.
    # The crest follows the pelvis, i.e. the second presacral vertebra, whatever its name.
    v2 = verts[1]
    r = rng.random()
    if r < 0.7:
        z_crest = _u(rng, discs[v2.name][0], v2.zm)  # L4-L5 disc .. mid L4
    elif r < 0.85:
        z_crest = _u(rng, v2.zm, discs[verts[2].name][1])  # upper L4 .. L3-L4 disc
    else:
        z_crest = _u(rng, lowest.zm, discs[v2.name][0])  # L5 body
    if height_m > 1.8:
        z_crest -= _u(rng, 0.0, 8.0)
    r_fh = _u(rng, 21.0, 25.0) * kw
    z_fh = z_crest - _u(rng, 88.0, 122.0) * k - r_fh
    x_fh = _u(rng, 82.0, 96.0) * kw * (1.0 if male else 1.05)
    z_per = z_fh - 55.0 * k
    z_knee = z_fh - 430.0 * k
    top_v = verts[-1]
    z_skull_base = top_v.z1 + 6.0 * k
    z_vertex = z_skull_base + _u(rng, 125.0, 145.0) * k
    t1 = vz["T1"]
    z_shoulder = t1.z1 - 5.0 * k
    last_rib = [v for v in verts if v.rib][0]  # lowest rib-bearing

    # --- habitus (BMI-driven SAT, VAT, muscularity)
    fat = max(0.0, bmi - 18.0)
    sat_base = max(2.5, fat * _u(rng, 1.4, 3.2) * (1.2 if not male else 1.0))
    vat_bulge = max(0.0, fat * _u(rng, 1.0, 6.5) * (1.25 if male else 0.8))
    mus = _u(rng, 0.7, 1.25) * (1.08 if male else 0.92) * (0.85 if age > 75 else 1.0)
    s_ant, s_lat, s_post = (
        sat_base * _u(rng, 0.9, 1.7),
        sat_base * _u(rng, 0.7, 1.3),
        sat_base * _u(rng, 0.5, 1.1),
    )
    gyn = 1.35 if not male else 1.0

    z_l1 = vz["L1"].zm
    z_t11 = last_rib.zm
    z_t9 = vz[f"T{max(1, n_rib_pairs - 3)}"].zm
    z_t6 = vz["T6"].zm
    z_t3 = vz["T3"].zm
    z_t1 = t1.zm
    dome_r = vz[f"T{max(1, n_rib_pairs - 3)}"].z0 + _u(rng, -20.0, 15.0)
    dome_l = dome_r - _u(rng, 5.0, 25.0)

    cav_a = Profile.of(
        [
            (z_per, 45 * kw),
            (z_fh, 62 * kw),
            (0.5 * (z_fh + z_crest), 92 * kw),
            (z_crest - 15 * k, 112 * kw + 0.3 * vat_bulge),
            (l3.zm, 112 * kw + vat_bulge),
            (z_l1, 122 * kw + 0.6 * vat_bulge),
            (z_t11, 132 * kw + 0.2 * vat_bulge),
            (z_t9, 137 * kw),
            (z_t6, 130 * kw),
            (z_t3, 108 * kw),
            (z_t1, 72 * kw),
            (t1.z1 + 15, 40 * kw),
        ]
    )
    cav_b_ant = Profile.of(
        [
            (z_per, 40 * kw),
            (z_fh, 70 * kw),
            (z_crest, 85 * kw + 0.6 * vat_bulge),
            (l3.zm, 85 * kw + 1.2 * vat_bulge),
            (z_l1, 90 * kw + 0.6 * vat_bulge),
            (z_t11, 105 * kw + 0.2 * vat_bulge),
            (z_t9, 115 * kw),
            (z_t6, 110 * kw),
            (z_t3, 80 * kw),
            (z_t1, 50 * kw),
            (t1.z1 + 15, 30 * kw),
        ]
    )
    m_lat = Profile.of(
        [
            (z_per, 45 * mus),
            (z_fh, 55 * mus),
            (z_crest - 20, 40 * mus),
            (z_crest + 10, 15 * mus),
            (l3.zm, 14 * mus),
            (z_t11, 12 * mus),
            (z_t6, 14 * mus),
            (z_t3, 25 * mus),
            (z_t1, 20 * mus),
        ]
    )
    m_ant = Profile.of(
        [
            (z_per, 15 * mus),
            (z_fh, 28 * mus),
            (z_crest, 11 * mus),
            (l3.zm, 12 * mus),
            (z_t9, 10 * mus),
            (z_t6, 22 * mus),
            (z_t3, 30 * mus),
            (z_t1, 15 * mus),
        ]
    )
    # distance from the back of the vertebral body to the inner back wall (paraspinals)
    para = Profile.of(
        [
            (z_per, 60 * mus),
            (-60, 75 * mus),
            (0, 70 * mus),
            (l3.zm, 68 * mus),
            (z_t11, 58 * mus),
            (z_t6, 50 * mus),
            (z_t1, 55 * mus),
        ]
    )
    sat_mult = Profile.of(
        [
            (z_knee, 0.7),
            (z_per, 1.0 * gyn),
            (z_fh, 1.1 * gyn),
            (z_crest, 1.0 * gyn),
            (l3.zm, 1.0),
            (z_t11, 0.8),
            (z_t6, 0.6),
            (z_t1, 0.5),
        ]
    )
    vb_depth = Profile.of([(-200, 30 * kw)] + [(v.zm, v.depth) for v in verts])
    vb_width = Profile.of([(-200, 45 * kw)] + [(v.zm, v.width) for v in verts])
    prof = {
        "cav_a": cav_a,
        "cav_b_ant": cav_b_ant,
        "m_lat": m_lat,
        "m_ant": m_ant,
        "para": para,
        "sat_mult": sat_mult,
        "vb_depth": vb_depth,
        "vb_width": vb_width,
    }
    sat = {"ant": s_ant, "lat": s_lat, "post": s_post}

    # --- HU per class (ANATOMY.md table; contrast = portal venous phase)
    contrast = bool(rng.random() < 0.6) if contrast is None else contrast
    osteo = rng.random() < (0.35 if age > 65 else 0.08)
    myo = rng.random() < 0.2
    hu = np.zeros(N_CLASSES, dtype=np.float32)
    hu_fat = _u(rng, -115.0, -85.0)
    hu_mus = _u(rng, 18.0, 38.0) if myo else _u(rng, 35.0, 58.0)
    hu[AIR] = -1000.0
    hu[SKIN] = _u(rng, 20.0, 50.0)
    hu[SAT] = hu_fat
    hu[MUSCLE] = hu_mus
    hu[IMAT] = hu_fat + _u(rng, 0.0, 20.0)
    hu[VAT] = hu_fat + _u(rng, -5.0, 15.0)
    hu[LIVER] = _u(rng, 95.0, 150.0) if contrast else _u(rng, 40.0, 65.0)
    hu[SPLEEN] = _u(rng, 100.0, 150.0) if contrast else _u(rng, 38.0, 55.0)
    hu[KIDNEY] = _u(rng, 140.0, 230.0) if contrast else _u(rng, 28.0, 40.0)
    hu[KIDNEY_MEDULLA] = _u(rng, 90.0, 160.0) if contrast else _u(rng, 20.0, 35.0)
    hu[BOWEL_WALL] = _u(rng, 35.0, 90.0) if contrast else _u(rng, 25.0, 45.0)
    hu[GAS] = _u(rng, -1000.0, -900.0)
    oral = contrast and rng.random() < 0.6
    hu[CONTRAST] = _u(rng, 150.0, 600.0) if oral else _u(rng, 5.0, 25.0)
    hu[FLUID] = _u(rng, 0.0, 25.0)
    hu[BLOOD] = _u(rng, 120.0, 220.0) if contrast else _u(rng, 35.0, 50.0)
    hu[HEART] = hu[BLOOD] * _u(rng, 0.85, 1.0)
    hu[LUNG] = _u(rng, -900.0, -780.0)
    hu[BLADDER] = _u(rng, 0.0, 20.0)
    hu[TABLE_SHELL] = _u(rng, -200.0, 250.0)
    hu[TABLE_CORE] = _u(rng, -950.0, -300.0)
    hu[BRAIN] = _u(rng, 28.0, 40.0)
    hu[FECES] = _u(rng, -300.0, 40.0)
    hu[ARM_FAT] = hu_fat
    hu[ARM_MUSCLE] = hu_mus
    hu[PAD] = _u(rng, -700.0, -150.0)
    hu[CSF] = _u(rng, 0.0, 15.0)
    bone_scale = _u(rng, 0.55, 0.8) if osteo else _u(rng, 0.85, 1.15)
    cort = _u(rng, 750.0, 1300.0) * bone_scale
    canc = _u(rng, 60.0, 120.0) if osteo else _u(rng, 150.0, 290.0)

    anat = Anatomy(
        seed=seed,
        sex=sex,
        height_m=float(height_m),
        weight_kg=float(weight_kg),
        age=age,
        scale=k,
        hu=hu,
        vertebrae=verts,
        variants={
            "n_lumbar": n_lumbar,
            "n_rib_pairs": n_rib_pairs,
            "n_presacral": len(verts),
            "transitional": transitional,
            "l3_convention": "counted from the top: first non-rib-bearing vertebra = L1",
            "scoliosis_mm": round(scol_amp, 1),
            "osteoporosis": bool(osteo),
            "myosteatosis": bool(myo),
            "contrast": contrast,
            "oral_contrast": bool(oral),
        },
        landmarks={
            "iliac_crest_top": z_crest,
            "femoral_head_centre": z_fh,
            "perineum": z_per,
            "knee": z_knee,
            "shoulder": z_shoulder,
            "skull_base": z_skull_base,
            "vertex": z_vertex,
            "dome_right": dome_r,
            "dome_left": dome_l,
            "s1_top": 0.0,
        },
        spine_x=spine_x,
        spine_y=spine_y,
        prof=prof,
        bones=[],
        soft_before=[],
        soft_after=[],
        table=None,
        dome={"right": dome_r, "left": dome_l},
        imat_fraction=_u(rng, 0.01, 0.06) * (2.0 if myo else 1.0),
        noise_hu=float(noise_hu)
        if noise_hu is not None
        else float(
            rng.choice(
                [_u(rng, 6.0, 15.0), _u(rng, 15.0, 35.0), _u(rng, 35.0, 70.0)], p=[0.4, 0.4, 0.2]
            )
        ),
        z_bottom=z_knee - 60.0,
        z_top=z_vertex,
        arms=arms,
        extra={
            "sat": sat,
            "r_fh": r_fh,
            "x_fh": x_fh,
            "cort": cort,
            "canc": canc,
            "mus": mus,
            "vat_bulge": vat_bulge,
            "sac_tilt": sac_tilt,
            "discs": discs,
            "male": male,
            "kw": kw,
        },
    )
    if metal is None:
        metal = bool(rng.random() < 0.06)
    if metal:
        kind = "hip" if rng.random() < 0.5 else "spine"
        anat.extra["metal_kind"] = kind
        if kind == "hip":
            anat.extra["metal_hip_side"] = -1.0 if rng.random() < 0.5 else 1.0
    anat.variants["metal"] = anat.extra.get("metal_kind")
    return anat


def torso_section(anat: Anatomy, z: float) -> dict[str, float]:
    """Superellipse parameters (mm) of the torso's cavity, muscle wall and skin at ``z``.

    Returns keys ``yc`` (centre, y), ``a_c, b_ca, b_cp`` (cavity half-width, anterior and
    posterior half-depths), ``a_i, b_ia, b_ip`` (outer surface of the muscle wall) and
    ``a_o, b_oa, b_op`` (skin), and ``spine_y``/``vb_d``.
    """
    p = anat.prof
    sy = anat.spine_y(z)
    vb_d = p["vb_depth"](z)
    yc = sy - 0.5 * vb_d
    a_c = p["cav_a"](z)
    b_ca = p["cav_b_ant"](z)
    b_cp = vb_d + 30.0 * anat.scale
    a_i = a_c + p["m_lat"](z)
    b_ia = b_ca + p["m_ant"](z)
    b_ip = vb_d + p["para"](z)
    sat = anat.extra["sat"]
    mult = p["sat_mult"](z)
    a_o = a_i + sat["lat"] * mult + 1.5
    b_oa = b_ia + sat["ant"] * mult + 1.5
    b_op = b_ip + sat["post"] * mult + 1.5
    return {
        "yc": yc,
        "a_c": a_c,
        "b_ca": b_ca,
        "b_cp": b_cp,
        "a_i": a_i,
        "b_ia": b_ia,
        "b_ip": b_ip,
        "a_o": a_o,
        "b_oa": b_oa,
        "b_op": b_op,
        "spine_y": sy,
        "vb_d": vb_d,
    }
