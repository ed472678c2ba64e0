"""Style B patient: a skeleton of implicit solids and Bezier tubes, a torso of harmonic
outlines, organs as ellipsoids (written independently of :mod:`worker.phantom`).

Frame (mm): x = patient right -> left, y = anterior -> posterior, z = inferior -> superior,
z = 0 at the top of the sacrum (S1 superior end plate). That is the DICOM patient frame
(LPS) up to a shift. Vertebrae are named from the top, as radiologists count them
(``/work/shared/ANATOMY.md``): C3..C7, every rib-bearing vertebra is thoracic (T1..Tn,
n = rib pairs), the first vertebra without ribs is L1, the presacral ones below are L2..Lm.
L3 is the third vertebra below the last rib-bearing one, whatever the transitional anatomy.

Nothing here draws pixels: :mod:`research.phantom_b.raster` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator

#: Thoracolumbar variant (11 or 13 rib pairs), numeric presacral variant (23 or 25
#: presacral vertebrae): ANATOMY.md quotes 4-5 % thoracolumbar, 5-7 % lumbosacral, 1 % numeric;
#: style B draws each rib variant with 3 % and each presacral count change with 3 %.
P_RIBS_11 = 0.03
P_RIBS_13 = 0.03
P_PRESACRAL_23 = 0.03
P_PRESACRAL_25 = 0.03

#: Lumbar transverse process, tip to midline (mm), from the top: L1 short, L3 longest
#: (ANATOMY.md tip to tip: L1 ~ 70, L3 90-100, L5 ~ 85). Ranges drawn per level.
TP_HALF_RANGE = {
    1: (33.0, 37.0),
    2: (39.0, 43.0),
    3: (45.5, 50.0),
    4: (42.0, 45.0),
    5: (40.0, 43.5),
}
TP_HALF_LOWEST = (38.5, 42.0)  # a sixth lumbar vertebra

#: Fields of view in z and their probabilities when not fixed by the spec.
FOVS: dict[str, float] = {
    "abdomen_pelvis": 0.25,
    "chest_abdomen_pelvis": 0.20,
    "abdomen": 0.15,
    "chest": 0.12,
    "lumbar": 0.18,
    "pelvis": 0.10,
}


@dataclass
class Level:
    """One vertebra: body between ``z0`` (inferior end plate) and ``z1`` (superior), mm."""

    name: str
    region: str  # "C", "T" or "L"
    z0: float
    z1: float
    x: float  # body centre, right -> left
    y: float  # body centre, anterior -> posterior
    width: float
    depth: float
    ribs: bool
    tp_half: float  # transverse process tip to the body's midline (mm)

    @property
    def zm(self) -> float:
        return 0.5 * (self.z0 + self.z1)


@dataclass
class Tube:
    """A bone tube along a polyline: points (n, 3) mm and radius (n,) mm."""

    points: np.ndarray
    radius: np.ndarray
    kind: str  # "rib", "process", "arch", "pelvis", "limb", "girdle"
    owner: str = ""  # vertebra name for ribs and processes


@dataclass
class Solid:
    """An implicit bone solid (see :mod:`research.phantom_b.raster` for the kinds)."""

    kind: str  # "rbox", "ball", "wedge", "wing"
    params: dict[str, float]


@dataclass
class Body:
    """A sampled style-B patient; every length in mm, every HU drawn within ANATOMY.md."""

    seed: int
    sex: str
    height_m: float
    weight_kg: float
    k: float  # length scale
    kw: float  # width scale
    levels: list[Level]  # from the bottom (lowest lumbar) up
    n_rib_pairs: int
    n_lumbar: int
    presacral: int
    transitional: str | None
    crest_z: float
    crest_x: float
    femoral_z: float
    femoral_x: float
    femoral_r: float
    dome_right: float
    dome_left: float
    spine_x: PchipInterpolator
    spine_y: PchipInterpolator
    core_a: PchipInterpolator  # torso core (muscle) half-width
    core_b: PchipInterpolator  # torso core half-depth
    fat: PchipInterpolator  # subcutaneous fat thickness
    wall: PchipInterpolator  # abdominal / chest wall muscle thickness
    harmonics: tuple[float, float, float]
    arms: str
    hu: dict[str, float]
    noise_sd: float
    kernel_cutoff: float  # noise spectrum cut-off, cycles per mm
    psf_mm: float
    table: dict[str, float] | None
    tubes: list[Tube] = field(default_factory=list)
    solids: list[Solid] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(name)

    @property
    def last_rib_level(self) -> Level:
        return [lv for lv in self.levels if lv.ribs][0]


def _pchip(z: list[float], v: np.ndarray) -> PchipInterpolator:
    """Monotone cubic through (z, v), knots sorted and closer than 5 mm merged."""
    order = np.argsort(z)
    zs, vs = [], []
    for i in order:
        if zs and z[i] - zs[-1] < 5.0:
            continue
        zs.append(float(z[i]))
        vs.append(float(np.asarray(v)[i]))
    return PchipInterpolator(zs, vs)


def _presacral_counts(
    rng: np.random.Generator, n_lumbar: int | None, n_rib_pairs: int | None
) -> tuple[int, int, int, str | None]:
    """(rib pairs, lumbar count, presacral count, transitional name or None)."""
    ribs = n_rib_pairs
    if ribs is None:
        r = rng.random()
        ribs = 11 if r < P_RIBS_11 else (13 if r < P_RIBS_11 + P_RIBS_13 else 12)
    r = rng.random()
    presacral = 23 if r < P_PRESACRAL_23 else (25 if r < P_PRESACRAL_23 + P_PRESACRAL_25 else 24)
    lumbar = n_lumbar if n_lumbar is not None else presacral - 7 - ribs
    if not 4 <= lumbar <= 6:
        lumbar = 24 - 7 - ribs
    if ribs not in (11, 12, 13) or lumbar not in (4, 5, 6):
        raise ValueError(f"n_rib_pairs must be 11-13 and n_lumbar 4-6, got {ribs}, {lumbar}")
    presacral = 7 + ribs + lumbar
    names = []
    if ribs != 12:
        names.append(f"{ribs}_rib_pairs")
    if lumbar != 5:
        names.append(f"{lumbar}_lumbar")
    return ribs, lumbar, presacral, "+".join(names) or None


def _stack(rng: np.random.Generator, ribs: int, lumbar: int, k: float, kw: float) -> tuple:
    """Vertebral bodies from the sacrum up: list of (name, region, z0, z1, width, depth)."""
    u = rng.uniform
    out = []
    z = u(7.0, 10.0) * k  # L5-S1 disc, the thinnest lumbar disc
    # lumbar heights rise from L1 to the lowest but one (ANATOMY.md: 25-30, L4/L5 largest)
    for i in range(lumbar, 0, -1):
        t = (i - 1) / max(lumbar - 1, 1)
        h = (25.5 + 3.5 * np.sin(np.pi * 0.5 * min(1.0, 1.25 * t))) * u(0.95, 1.05) * k
        w = (41.0 + 8.0 * t) * u(0.96, 1.04) * kw
        d = (30.5 + 4.0 * t) * u(0.96, 1.04) * kw
        out.append((f"L{i}", "L", z, z + h, w, d))
        z += h + u(8.0, 12.0) * k
    z -= u(8.0, 12.0) * k * 0.55  # the T/L disc is thinner
    for i in range(ribs, 0, -1):
        t = (i - 1) / max(ribs - 1, 1)
        h = (15.0 + 9.5 * t**1.2) * u(0.95, 1.05) * k
        w = (27.0 + 13.0 * t) * kw
        d = (18.0 + 12.0 * t) * kw
        out.append((f"T{i}", "T", z, z + h, w, d))
        z += h + (3.0 + 2.5 * t) * u(0.85, 1.15) * k
    for i in range(7, 2, -1):
        h = 13.5 * u(0.93, 1.07) * k
        out.append((f"C{i}", "C", z, z + h, 19.0 * kw, 15.0 * kw))
        z += h + 4.5 * k
    return out


def sample_body(
    seed: int,
    rng: np.random.Generator,
    *,
    n_lumbar: int | None = None,
    n_rib_pairs: int | None = None,
    arms: str | None = None,
) -> Body:
    """Draw a style-B patient (skeleton landmarks, torso profiles, HU) from ``rng``.

    Parameters
    ----------
    seed : recorded in the result.
    rng : the only source of randomness.
    n_lumbar, n_rib_pairs : fixed (4-6, 11-13) or None to draw the transitional variants.
    arms : "down", "up" or None to draw.

    Returns
    -------
    Body
        Without tubes and solids (added by :func:`research.phantom_b.skeleton.build`).

    Raises
    ------
    ValueError
        Counts out of range.
    """
    u = rng.uniform
    sex = "M" if rng.random() < 0.5 else "F"
    male = sex == "M"
    height = float(np.clip(rng.normal(1.75 if male else 1.62, 0.075), 1.45, 2.02))
    bmi = float(np.clip(rng.lognormal(np.log(26.5), 0.2), 16.0, 48.0))
    k = height / 1.70 * u(0.97, 1.03)
    kw = (height / 1.70) ** 0.6 * (1.0 if male else 0.93) * u(0.95, 1.05)
    arms = arms or ("down" if rng.random() < 0.5 else "up")
    ribs, lumbar, presacral, transitional = _presacral_counts(rng, n_lumbar, n_rib_pairs)
    raw = _stack(rng, ribs, lumbar, k, kw)

    # spinal curves as smooth splines through random control offsets
    zl = {r[0]: 0.5 * (r[2] + r[3]) for r in raw}
    l3z, t12z = zl["L3"], zl[f"T{ribs}"]
    t7z, t1z, c5z = zl["T7"], zl["T1"], zl["C5"]
    lord, kyph = u(6.0, 20.0) * k, u(8.0, 28.0) * k
    y_pts = [-60.0, 0.0, l3z, t12z, t7z, t1z, c5z, c5z + 60]
    y_val = [18.0 * k, 4.0, -lord, -0.2 * lord, kyph, 0.3 * kyph, -0.2 * kyph, -0.2 * kyph]
    amp = float(rng.choice([0.0, u(2.0, 7.0), u(8.0, 20.0)], p=[0.55, 0.33, 0.12]))
    x_val = [0.0, 0.0, amp * u(-1, 1), amp * u(-1, 1), amp * u(-1, 1), 0.3 * amp * u(-1, 1)]
    spine_y = PchipInterpolator(y_pts, y_val, extrapolate=True)
    spine_x = PchipInterpolator([-60.0, 0.0, l3z, t12z, t7z, t1z], x_val, extrapolate=True)

    levels = []
    for name, region, z0, z1, w, d in raw:
        zm = 0.5 * (z0 + z1)
        if region == "L":
            idx = int(name[1:])
            rank = idx if idx <= 3 else 5 - (lumbar - idx)  # the lowest two are "L4", "L5"
            lo, hi = TP_HALF_RANGE.get(rank, TP_HALF_LOWEST)
            if lumbar == 6 and idx == 6:
                lo, hi = TP_HALF_LOWEST
            tp = u(lo, hi) * kw
        elif region == "T":
            tp = (26.0 + 6.0 * (int(name[1:]) / ribs)) * kw
        else:
            tp = 18.0 * kw
        levels.append(
            Level(
                name,
                region,
                z0,
                z1,
                float(spine_x(zm)),
                float(spine_y(zm)),
                w,
                d,
                region == "T",
                tp,
            )
        )
    by = {lv.name: lv for lv in levels}

    # pelvis: the crest follows the second presacral vertebra from the sacrum (ANATOMY.md:
    # top of the crests at the L4 body or the L4-L5 disc in most, L3-L4 in a minority,
    # lower in tall people)
    v1, v2, v3 = levels[0], levels[1], levels[2]
    r = rng.random()
    if r < 0.65:
        crest = u(v1.z1, v2.zm)  # the L4-L5 disc .. mid L4
    elif r < 0.85:
        crest = u(v2.zm, v3.z0)  # upper L4 .. the L3-L4 disc
    else:
        crest = u(v1.zm, v1.z1)  # upper L5
    if height > 1.82:
        crest -= u(0.0, 10.0)
    fem_r = u(22.0, 25.0) * kw
    fem_z = crest - u(82.0, 110.0) * k  # ANATOMY.md: 80-110 below the crest top
    fem_x = u(80.0, 95.0) * kw * (1.0 if male else 1.04)
    crest_x = u(118.0, 140.0) * kw * (1.0 if male else 1.05)

    # torso: core (muscle boundary) half-width and half-depth at landmarks
    vat = max(0.0, bmi - 20.0) * u(0.8, 4.5) * (1.2 if male else 0.8)
    t_last = by[f"T{ribs}"].zm
    t8, t4 = by[f"T{min(8, ribs)}"].zm, by["T4"].zm
    top = by["T1"].z1
    knots = [fem_z - 140, fem_z, crest, l3z, by["L1"].zm, t_last, t8, t4, top, top + 40, top + 300]
    a = [95, 150, 138, 122 + 0.4 * vat, 126 + 0.3 * vat, 134, 140, 142, 150, 60, 55]
    b = [70, 92, 88 + 0.5 * vat, 86 + vat, 90 + 0.6 * vat, 100, 108, 100, 78, 55, 55]
    wmul = kw * u(0.93, 1.07)
    core_a = _pchip(knots, np.array(a) * wmul)
    core_b = _pchip(knots, np.array(b) * wmul)
    sat0 = max(3.0, (bmi - 17.0) * u(1.3, 3.0))
    gyn = 1.0 if male else 1.35
    fat = _pchip(
        knots,
        sat0
        * np.array([0.9 * gyn, 1.1 * gyn, 1.1 * gyn, 1.0, 0.9, 0.75, 0.6, 0.55, 0.5, 0.4, 0.4]),
    )
    mus = u(0.75, 1.2) * (1.1 if male else 0.9)
    wall = _pchip(knots, mus * np.array([30, 34, 20, 15, 14, 12, 11, 16, 22, 14, 14], dtype=float))
    dome_right = by[f"T{max(1, ribs - 2)}"].z0 + u(-25.0, 10.0) * k
    dome_left = dome_right - u(5.0, 25.0)

    # HU (ANATOMY.md), drawn once per patient
    contrast = str(rng.choice(["none", "portal", "arterial"], p=[0.3, 0.55, 0.15]))
    osteo = rng.random() < 0.15
    hu = {
        "fat": u(-118.0, -82.0),
        "muscle": u(20.0, 40.0) if rng.random() < 0.2 else u(32.0, 58.0),
        "organ": u(40.0, 60.0) if contrast == "none" else u(90.0, 155.0),
        "blood": {"none": u(35, 50), "portal": u(125, 195), "arterial": u(210, 390)}[contrast],
        "lung": u(-890.0, -720.0),
        "gas": u(-1000.0, -910.0),
        "fluid": u(0.0, 25.0),
        "oral": u(160.0, 550.0) if rng.random() < 0.3 else u(10.0, 40.0),
        "cortical": u(700.0, 1400.0) * (0.7 if osteo else 1.0),
        "cancellous": u(55.0, 115.0) if osteo else u(150.0, 290.0),
        "disc": u(60.0, 110.0),
        "skin": u(30.0, 70.0),
    }
    table = None
    if rng.random() < 0.8:
        table = {"hu": u(-300.0, 150.0), "thick": u(25.0, 60.0), "half": u(200.0, 260.0)}
    return Body(
        seed=seed,
        sex=sex,
        height_m=height,
        weight_kg=bmi * height**2,
        k=k,
        kw=kw,
        levels=levels,
        n_rib_pairs=ribs,
        n_lumbar=lumbar,
        presacral=presacral,
        transitional=transitional,
        crest_z=crest,
        crest_x=crest_x,
        femoral_z=fem_z,
        femoral_x=fem_x,
        femoral_r=fem_r,
        dome_right=dome_right,
        dome_left=dome_left,
        spine_x=spine_x,
        spine_y=spine_y,
        core_a=core_a,
        core_b=core_b,
        fat=fat,
        wall=wall,
        harmonics=(u(-0.05, 0.05), u(0.0, 0.04), u(0.0, 2 * np.pi)),
        arms=arms,
        hu=hu,
        noise_sd=float(rng.choice([u(4.0, 12.0), u(12.0, 28.0), u(28.0, 50.0)], p=[0.4, 0.4, 0.2])),
        kernel_cutoff=u(0.25, 0.7),
        psf_mm=u(0.4, 1.1),
        table=table,
        extra={"bmi": bmi, "vat": vat, "contrast": contrast == "none" and 0.0 or 1.0},
    )
