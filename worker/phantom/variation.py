"""Spine variation for domain randomisation (issue 15): degenerative and osteoporotic spines.

The default phantom's vertebrae follow smooth size rules (ANATOMY.md). A network that counts
vertebrae must not rely on that regularity, so :func:`apply_spine_variation` changes a
sampled body, before its skeleton is built, the ways real spines differ:

* each body's height, width and depth by +/- 10 % (individual variation);
* disc degeneration: a disc with probability 0.35 keeps 45-100 % of its height (ANATOMY.md:
  lumbar discs 8-12 mm; degenerated ones collapse);
* an osteoporotic compression fracture with probability 0.25: one body from T11 to L4 keeps
  55-80 % of its height;
* marginal osteophytes with probability 0.4 per patient: bony lips 2-6 mm wide and 2-5 mm
  high on the end plates of the lower thoracic and lumbar bodies (half of them), which can
  bridge a collapsed disc (``worker.phantom.skeleton`` draws them as part of their body);
* the two lowest rib pairs, thinner and shorter or longer: the last pair's shaft radius x
  0.55-1.0 and length x 0.45-1.15, the pair above x 0.75-1.0 and x 0.8-1.1 (ANATOMY.md: the
  12th ribs are short and floating; in patients they range from a stub of a few cm to a
  long rib, and a thin one is easily missed when counting from the ribs);
* the two lowest rib pairs' slope, drawn apart from their length: the descent of the last
  pair along its length x :data:`LAST_RIB_DROP` and of the pair above x
  :data:`PENULTIMATE_RIB_DROP` (a short 12th rib may run almost horizontally or fall steeply
  down and out; with the length scale above, a steep stub and a long flat rib are both
  drawn, so that the network learns a rib by where it starts, not by one shape);
* a curved sacrum instead of the default straight stack of horizontal segments: S1-S5
  along a kyphotic curve, each end plate perpendicular to it, the S1 end plate inclined
  :data:`SACRAL_SLOPE_DEG` from the horizontal (posterior edge highest, the promontory
  forward and down) and the axis turning forward by :data:`SACRAL_TURN_DEG` to the lower
  end of S5 (``worker.phantom.skeleton._curved_sacrum``). Standing adults' sacral slope is
  about 40 +/- 8 degrees (Legaye et al., Eur Spine J 1998;7:99-103); the lordosis below
  tilts L5 with it, so the L5-S1 disc stays a wedge open in front. What a horizontal-slab
  sacrum teaches the level network (an S1 that looks like a lumbar body, cut square) is
  what a real pelvis does not show. Below S1 the lateral masses are one curved plate
  reaching the sacro-iliac joints (``skeleton._sacral_wings``);
* the sacrum's marrow: its cancellous HU :data:`SACRAL_MARROW` times the lumbar bodies'
  (fatty marrow conversion reaches the sacrum early; in the real case's box the sacrum's
  median is 91 HU, its L5's 179);
* the sacrum's dorsal half: a sacral canal behind S1-S3 (:data:`SACRAL_CANAL_DEPTH_MM` deep,
  :data:`SACRAL_CANAL_HALF_WIDTH_MM` wide to each side at S1, both narrowing downwards) under
  a dorsal wall of fused laminae with a median crest, and lateral masses beside the canal
  as deep as :data:`SACRAL_MASS_DEPTH` times the S1 body (``skeleton._sacral_roof``,
  ``skeleton._sacral_wings``). In an axial CT slice through S1-S2 the sacrum is a broad bony
  mass whose body is only its front third, with the canal behind the body and the lateral
  masses reaching back to the dorsal wall; a body with a thin wing plate, which the phantom
  drew before, is not what a real pelvis shows (standard anatomy: the canal is triangular
  above, about 10-16 mm deep and 25-32 mm wide at S1, flattening downwards to the hiatus at
  S4-S5; the lateral masses carry the auricular surfaces over S1-S3);
* a lumbar lordosis that follows the sacral slope: the default column's lordosis is shallow
  (its lumbar apex lies 3-8 mm in front of the line from T12 to S1; in adults the L1-S1
  lordosis is 60 +/- 10 degrees, and it follows the sacral slope, on average LL about
  SS + 20: Vialle et al., J Bone Joint Surg Am 2005;87:260-267). The lumbar column is
  moved forward by a skewed bump (:func:`lordosis_offset`, largest 40 % of the way up the
  lumbar spine, zero at the top of S1 and of L1) so that L5 leans forward
  :data:`L5_S1_WEDGE_DEG` less than the S1 end plate; each lumbar body and disc then
  follows the curve, its end plates perpendicular to it (``anat.extra["lordosis"]``,
  drawn by ``worker.phantom.skeleton``).

The column is restacked from the top of S1 (z = 0) upwards, so the levels above a changed
one move; the landmarks of the body (iliac crests, diaphragm) stay where they were, which
changes the spine's relation to them as much as real patients differ. Draws come from the
phantom seed's own generator for this purpose: a phantom without variation is unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from worker.phantom.anatomy import Anatomy

__all__ = ["apply_spine_variation", "lordosis_offset"]

#: Levels an osteoporotic compression fracture is drawn among (the thoracolumbar junction
#: and the lumbar spine, where they are commonest).
FRACTURE_LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4")

#: Scale of the last rib pair's descent along its length (its slope), drawn uniformly.
LAST_RIB_DROP = (0.7, 1.8)
#: Scale of the descent of the rib pair above the last.
PENULTIMATE_RIB_DROP = (0.85, 1.3)
#: Inclination of the S1 end plate from the horizontal (degrees), drawn uniformly: standing
#: adults' sacral slope 40 +/- 8 (Legaye et al. 1998; Vialle et al. 2005 41 +/- 8.4).
SACRAL_SLOPE_DEG = (28.0, 50.0)
#: The L5-S1 disc's wedge (degrees): the S1 end plate is inclined this much more than the
#: lower end plate of L5 (a lordotic disc, taller in front).
L5_S1_WEDGE_DEG = (8.0, 18.0)
#: The sacral bodies' and lateral masses' cancellous HU as a fraction of the lumbar bodies'
#: (drawn uniformly): red marrow turns to fat earlier and further in the sacrum and pelvis
#: than in the lumbar bodies (Ricci et al., Radiology 1990;177:83-88, MR of the axial
#: skeleton's marrow by age), so on CT the sacrum's trabecular bone can be much darker than
#: L5's.
SACRAL_MARROW = (0.3, 1.0)
#: Where the lordosis bump of :func:`lordosis_offset` peaks, as a fraction of the lumbar
#: height from the top of S1 (the lower lumbar levels carry two thirds of the lordosis).
LORDOSIS_PEAK = 0.4
#: How far the sacrum's axis turns forward from the top of S1 to the end of S5 (degrees).
SACRAL_TURN_DEG = (15.0, 40.0)
#: Depth (mm, front to back, at S1, before the body-size scale) of the sacral canal behind
#: the S1 body, drawn uniformly; it narrows to half by the bottom of S3.
SACRAL_CANAL_DEPTH_MM = (10.0, 16.0)
#: Half-width (mm, at S1, before the body-size scale) of the sacral canal, drawn uniformly;
#: it narrows by 40 % by the bottom of S3.
SACRAL_CANAL_HALF_WIDTH_MM = (12.0, 16.0)
#: Front-to-back depth of the lateral masses beside the canal at S1, as a fraction of the
#: S1 body's depth (drawn uniformly); it tapers to 40 % at S4.
SACRAL_MASS_DEPTH = (1.0, 1.4)


_BUMP_MAX = LORDOSIS_PEAK * (1.0 - LORDOSIS_PEAK) ** 1.5


def lordosis_offset(z_mm: float, height_mm: float, lumbar_top_mm: float) -> float:
    """Forward (anterior: negative y) shift (mm) of the column at ``z_mm`` added by the lordosis.

    ``-height * t (1 - t)^1.5 / max`` with ``t = z / lumbar_top`` (0 at the top of S1, 1 at the
    top of the highest lumbar body): zero at both ends, steepest at the lumbosacral junction,
    highest at :data:`LORDOSIS_PEAK` of the way up, flat where it meets the thoracic column.
    Zero outside ``0 < z < lumbar_top``.
    """
    if not 0.0 < z_mm < lumbar_top_mm:
        return 0.0
    t = z_mm / lumbar_top_mm
    return -height_mm * t * (1.0 - t) ** 1.5 / _BUMP_MAX


def apply_spine_variation(anat: Anatomy, seed: int) -> None:
    """Vary the vertebral column of ``anat`` in place (module docstring).

    Parameters
    ----------
    anat : from :func:`worker.phantom.anatomy.sample_body`, before its skeleton is built.
    seed : the phantom's seed; the draws use ``default_rng([seed, 0x5D1E])``.

    Notes
    -----
    Records ``anat.variants["spine_variation"]`` (what was changed),
    ``anat.extra["osteophytes"]`` (vertebra name -> lip width, lip height in mm) and
    ``anat.extra["lower_rib_scale"]`` (0 for the last rib pair, 1 for the pair above ->
    scale of the shaft radius, scale of the length), ``anat.extra["lower_rib_drop"]`` (the
    same keys -> scale of the descent along the rib: its slope) and
    ``anat.extra["sacrum_shape"]`` and ``anat.extra["lordosis"]`` (the bump's height and the
    lumbar height, mm; ``anat.spine_y`` and the vertebrae's ``cy`` include it).
    """
    rng = np.random.default_rng([seed, 0x5D1E])
    verts = anat.vertebrae  # bottom (lowest lumbar) first, as stacked
    discs: dict[str, tuple[float, float]] = anat.extra["discs"]
    heights = {v.name: v.z1 - v.z0 for v in verts}
    disc_h = {name: d1 - d0 for name, (d0, d1) in discs.items()}
    record: dict[str, object] = {}
    for v in verts:
        heights[v.name] *= float(rng.uniform(0.9, 1.1))
        v.width *= float(rng.uniform(0.9, 1.1))
        v.depth *= float(rng.uniform(0.9, 1.1))
    degenerate = []
    for v in verts:
        if v.region in ("L", "T") and rng.random() < 0.35:
            disc_h[v.name] *= float(rng.uniform(0.45, 1.0))
            degenerate.append(v.name)
    record["degenerated_discs_below"] = degenerate
    if rng.random() < 0.25:
        names = [n for n in FRACTURE_LEVELS if n in heights]
        level = str(rng.choice(names))
        keep = float(rng.uniform(0.55, 0.8))
        heights[level] *= keep
        record["compression_fracture"] = {"level": level, "height_kept": round(keep, 2)}
    osteophytes: dict[str, tuple[float, float]] = {}
    if rng.random() < 0.4:
        for v in verts:
            low_thoracic = v.region == "T" and int(v.name[1:]) >= 9
            if (v.region == "L" or low_thoracic) and rng.random() < 0.5:
                osteophytes[v.name] = (float(rng.uniform(2.0, 6.0)), float(rng.uniform(2.0, 5.0)))
    record["osteophytes"] = sorted(osteophytes)
    lower_ribs: dict[int, tuple[float, float]] = {}
    for from_last, (r_lo, l_lo, l_hi) in ((0, (0.55, 0.45, 1.15)), (1, (0.75, 0.8, 1.1))):
        lower_ribs[from_last] = (float(rng.uniform(r_lo, 1.0)), float(rng.uniform(l_lo, l_hi)))
    record["lower_ribs"] = {  # from the last rib pair up: (radius, length) scales
        str(k): [round(r, 2), round(ln, 2)] for k, (r, ln) in lower_ribs.items()
    }
    # restack from the top of S1 upwards
    z = 0.0
    for v in verts:
        discs[v.name] = (z, z + disc_h[v.name])
        z += disc_h[v.name]
        v.z0, v.z1 = z, z + heights[v.name]
        z = v.z1
    # the sacrum's own shape (drawn last: the draws above stay those of earlier versions)
    sacrum = {
        "slope_deg": float(rng.uniform(*SACRAL_SLOPE_DEG)),
        "turn_deg": float(rng.uniform(*SACRAL_TURN_DEG)),
    }
    record["sacrum"] = {k: round(v, 1) for k, v in sacrum.items()}
    # the lowest ribs' slope (drawn after the sacrum: the draws above stay those of earlier
    # versions)
    rib_drop = {0: float(rng.uniform(*LAST_RIB_DROP)), 1: float(rng.uniform(*PENULTIMATE_RIB_DROP))}
    record["lower_rib_drop"] = {str(k): round(v, 2) for k, v in rib_drop.items()}
    # the lordosis that balances the sacral slope (drawn last: the draws above stay)
    wedge = float(rng.uniform(*L5_S1_WEDGE_DEG))
    lumbar_top = max(v.z1 for v in verts if v.region == "L")
    base = anat.spine_y
    z5 = verts[0].z0  # the lower end plate of the lowest lumbar body
    base_lean = -(base(z5 + 0.5) - base(z5 - 0.5))  # forward lean (-dy/dz) there
    target = math.tan(math.radians(max(sacrum["slope_deg"] - wedge, 0.0)))
    t5 = z5 / lumbar_top
    bump_slope = ((1.0 - t5) ** 1.5 - 1.5 * t5 * (1.0 - t5) ** 0.5) / _BUMP_MAX  # d/dt
    height = max(0.0, (target - base_lean) * lumbar_top / bump_slope)
    record["lordosis"] = {"wedge_deg": round(wedge, 1), "bump_mm": round(height, 1)}

    def spine_y(z: float) -> float:
        return base(z) + lordosis_offset(z, height, lumbar_top)

    anat.spine_y = spine_y
    # the sacrum's marrow (drawn after the lordosis: the draws above stay)
    sacrum["marrow"] = float(rng.uniform(*SACRAL_MARROW))
    record["sacrum"]["marrow"] = round(sacrum["marrow"], 2)
    # the sacrum's canal, dorsal wall and deep lateral masses (drawn last: the draws above
    # stay)
    sacrum["canal_depth_mm"] = float(rng.uniform(*SACRAL_CANAL_DEPTH_MM))
    sacrum["canal_half_width_mm"] = float(rng.uniform(*SACRAL_CANAL_HALF_WIDTH_MM))
    sacrum["mass_depth"] = float(rng.uniform(*SACRAL_MASS_DEPTH))
    for key in ("canal_depth_mm", "canal_half_width_mm", "mass_depth"):
        record["sacrum"][key] = round(sacrum[key], 2)
    for v in verts:
        v.cy = spine_y(v.zm)
    anat.extra["lordosis"] = {"bump_mm": height, "lumbar_top_mm": lumbar_top}
    anat.extra["osteophytes"] = osteophytes
    anat.extra["lower_rib_scale"] = lower_ribs
    anat.extra["lower_rib_drop"] = rib_drop
    anat.extra["sacrum_shape"] = sacrum
    anat.variants["spine_variation"] = record
