"""The phantom's skeleton as analytic bone primitives (body frame, mm; see ``anatomy``).

Spine (vertebral bodies, discs, pedicles, laminae, spinous and transverse processes,
articular pillars), ribs with costal cartilages, sternum, clavicles, scapulae, sacrum and
coccyx, iliac wings with their crest, pubic and ischial rami, acetabula, femora, humeri and
forearms, skull. Sizes from ANATOMY.md, scaled with the patient.
"""

from __future__ import annotations

import math

import numpy as np

from worker.phantom.anatomy import LUMBAR_TP_HALF, Anatomy, Vertebra, torso_section
from worker.phantom.primitives import Capsule, Ellipsoid, Plate, Slab


def _chain(
    pts: np.ndarray, r: float | np.ndarray, cort: float, canc: float, shell: float = 1.5
) -> list[Capsule]:
    """Capsules joining consecutive points of a (n, 3) polyline; ``r`` scalar or (n,)."""
    rr = np.broadcast_to(np.asarray(r, dtype=float), (len(pts),))
    return [
        Capsule(tuple(pts[i]), tuple(pts[i + 1]), float(rr[i]), float(rr[i + 1]), cort, canc, shell)
        for i in range(len(pts) - 1)
    ]


def build_skeleton(anat: Anatomy, rng: np.random.Generator) -> None:
    """Append every bone primitive of ``anat`` to ``anat.bones``.

    Also records ``anat.extra["bone_tags"]``: part name -> indices into ``anat.bones`` of
    the primitives that draw it (``"body:<vertebra name>"`` per vertebral body, ``"rib"``
    the bony ribs without their cartilages, ``"sacrum"`` the sacral segments and alae), the
    reference segmentation of the level-verification network
    (:mod:`worker.phantom.spine_box`). Tagging draws no random numbers: every seed's
    phantom is unchanged.
    """
    e = anat.extra
    tags: dict[str, list[int]] = {}
    e["bone_tags"] = tags
    cort, canc = float(e["cort"]), float(e["canc"])
    k = anat.scale
    bones = anat.bones
    verts = anat.vertebrae
    discs = e["discs"]
    disc_hu = float(rng.uniform(70.0, 110.0))
    lumbar = [v for v in verts if v.region == "L"]

    # ---------------------------------------------------------------- vertebral column
    curve = _LumbarCurve(anat)
    for i, v in enumerate(verts):
        lo = verts[i - 1] if i > 0 else None
        d0, d1 = discs[v.name]
        # disc below this body
        cx0 = lo.cx if lo else 0.0
        cy0 = lo.cy if lo else anat.spine_y(0.0)
        (cy0, cy1), (t0, t1), d0 = curve.disc((cy0, v.cy), (d0, d1), lo is None)
        bones.append(
            Slab(
                (cx0, cy0),
                (v.cx, cy1),
                d0,
                d1,
                v.width / 2 * 0.97,
                v.depth / 2 * 0.97,
                disc_hu,
                disc_hu,
                0.5,
                0.5,
                waist=0.0,
                tilt0=t0,
                tilt1=t1,
            )
        )
        (cy0, cy1), (t0, t1) = curve.body(v)
        tags[f"body:{v.name}"] = [len(bones)]
        bones.append(
            Slab(
                (v.cx, cy0),
                (v.cx, cy1),
                v.z0,
                v.z1,
                v.width / 2,
                v.depth / 2,
                cort * 0.95,
                canc,
                shell_mm=1.3,
                endplate_mm=1.2,
                waist=0.07,
                tilt0=t0,
                tilt1=t1,
            )
        )
        lips = e.get("osteophytes", {}).get(v.name)  # worker.phantom.variation
        if lips is not None:
            # marginal osteophytes: a cortical rim beyond each end plate, part of this body
            lw, lh = lips
            for za, zb, yc, tilt in (
                (v.z0 - lh, v.z0 + 1.0, cy0, t0),
                (v.z1 - 1.0, v.z1 + lh, cy1, t1),
            ):
                tags[f"body:{v.name}"].append(len(bones))
                bones.append(
                    Slab(
                        (v.cx, yc),
                        (v.cx, yc),
                        za,
                        zb,
                        v.width / 2 + lw,
                        v.depth / 2 + 0.6 * lw,
                        cort * 0.9,
                        disc_hu,
                        shell_mm=1.5,
                        endplate_mm=0.0,
                        waist=0.0,
                        tilt0=tilt,
                        tilt1=tilt,
                    )
                )
        h = v.z1 - v.z0
        back = v.cy + v.depth / 2  # posterior wall of the body
        ped_x = 0.33 * v.width
        zp = v.z0 + 0.62 * h
        if v.region == "L":
            rank = int(v.name[1:]) - 1
            tp = LUMBAR_TP_HALF[min(rank, 5)] * float(rng.uniform(0.92, 1.08)) * (v.width / 45.0)
            if rank == len(lumbar) - 1 and len(lumbar) == 4:
                tp *= 1.25  # sacralised lowest lumbar: broad "batwing" processes
            ped_r, tp_r, sp_len, sp_drop, sp_r, canal = 6.0, 5.5, 32.0, 6.0, 5.5, 9.0
            tp_y = back + 8.0
        elif v.region == "T":
            idx = int(v.name[1:])
            tp = (38.0 - 10.0 * idx / 12.0) * k
            ped_r, tp_r, sp_len, sp_drop, sp_r, canal = 4.5, 5.0, 30.0, 22.0, 4.0, 8.0
            tp_y = back + 20.0
        else:
            tp = 26.0 * k
            ped_r, tp_r, sp_len, sp_drop, sp_r, canal = 3.5, 3.5, 22.0, 5.0, 3.5, 8.0
            tp_y = back + 4.0
        ped_r *= k
        tp_r *= k
        lam_y = back + 2 * canal * k + 6.0
        for s in (-1.0, 1.0):
            bones.append(
                Capsule(
                    (v.cx + s * ped_x, back - 2, zp),
                    (v.cx + s * ped_x, back + 12 * k, zp),
                    ped_r,
                    ped_r,
                    cort * 0.9,
                    canc,
                    1.6,
                )
            )
            # lamina to the midline
            bones.append(
                Capsule(
                    (v.cx + s * ped_x, back + 12 * k, zp),
                    (v.cx, lam_y, zp - 3 * k),
                    ped_r * 0.75,
                    ped_r * 0.75,
                    cort * 0.85,
                    canc,
                    1.4,
                )
            )
            # articular pillar (superior and inferior processes): vertical column
            bones.append(
                Capsule(
                    (v.cx + s * ped_x * 1.05, back + 14 * k, v.z0 - 0.3 * h),
                    (v.cx + s * ped_x * 1.05, back + 14 * k, v.z1 + 0.15 * h),
                    ped_r * 0.85,
                    ped_r * 0.85,
                    cort * 0.85,
                    canc,
                    1.4,
                )
            )
            # transverse process
            bones.append(
                Capsule(
                    (v.cx + s * ped_x, back + 8 * k, zp),
                    (v.cx + s * tp, tp_y, zp - (4 * k if v.region == "T" else 0)),
                    tp_r,
                    tp_r * 0.8,
                    cort * 0.85,
                    canc,
                    1.4,
                )
            )
        # spinous process
        bones.append(
            Capsule(
                (v.cx, lam_y, zp - 3 * k),
                (v.cx, lam_y + sp_len * k, zp - sp_drop * k - 3 * k),
                sp_r * k,
                sp_r * k * 1.1,
                cort * 0.85,
                canc,
                1.4,
            )
        )
        if v.region == "L":
            bones.append(
                Capsule(
                    (v.cx, lam_y + 4, zp - 8 * k),
                    (v.cx, lam_y + sp_len * k, zp - 12 * k),
                    4.0 * k,
                    4.5 * k,
                    cort * 0.85,
                    canc,
                    1.4,
                )
            )

    # ---------------------------------------------------------------- ribs
    ribs = [v for v in verts if v.rib]
    n_rib = len(ribs)
    sternum_top = anat.vertebra("T2").z1 + 5 * k
    sternum_bot = anat.vertebra(f"T{min(9, n_rib)}").zm
    ster_y = []
    for v in ribs:
        idx = int(v.name[1:])  # rib number, 1 = top
        from_last = n_rib - idx  # 0 = last rib-bearing vertebra
        z_head = v.z1 - 0.15 * (v.z1 - v.z0)
        if idx <= 7:
            phi_end, drop = 0.80 * np.pi, [22, 40, 58, 70, 78, 82, 86][idx - 1]
        elif from_last >= 2:
            phi_end, drop = 0.70 * np.pi, 88.0
        elif from_last == 1:
            phi_end, drop = 0.52 * np.pi * float(rng.uniform(0.85, 1.1)), 62.0
        else:
            phi_end, drop = 0.36 * np.pi * float(rng.uniform(0.8, 1.15)), 48.0
        if n_rib == 13 and from_last == 0:
            phi_end, drop = 0.22 * np.pi, 30.0  # short lumbar-type rib
        drop *= 1.2 * k * float(rng.uniform(0.85, 1.15))
        if from_last <= 1:  # a simulated site's long lower ribs (worker.phantom.apply_site)
            drop *= float(anat.extra.get("lower_rib_drop_scale", 1.0))
        r_rib = (5.5 if idx <= 2 else 4.6) * k
        scale = anat.extra.get("lower_rib_scale", {}).get(from_last)  # worker.phantom.variation
        if scale is not None:  # a thinner, shorter or longer lower rib, the same slope
            r_rib *= scale[0]
            phi_end = 0.16 * np.pi + (phi_end - 0.16 * np.pi) * scale[1]
            drop *= scale[1]
        # a flatter or steeper lower rib (worker.phantom.variation)
        drop *= anat.extra.get("lower_rib_drop", {}).get(from_last, 1.0)
        phis = np.linspace(0.16 * np.pi, phi_end, 11)
        pts = []
        for s in (-1.0, 1.0):
            head = np.array([v.cx + s * (v.width / 2 + 2), v.cy + v.depth / 2 - 2, z_head])
            tub_y = v.cy + v.depth / 2 + 18 * k
            tub = np.array([v.cx + s * (32 * k), tub_y, z_head - 2])
            pts = [head, tub]
            for j, phi in enumerate(phis):
                f = (phi - phis[0]) / (phis[-1] - phis[0])
                zz = z_head - 4 - drop * f**0.9
                sec = torso_section(anat, zz)
                a = sec["a_c"] + 0.35 * anat.prof["m_lat"](zz)
                yc = sec["yc"]
                if phi < np.pi / 2:
                    b = sec["b_cp"] + 0.3 * (sec["b_ip"] - sec["b_cp"])
                    y = yc + b * np.cos(phi)
                else:
                    b = sec["b_ca"] + 0.3 * anat.prof["m_ant"](zz)
                    y = yc + b * np.cos(phi)
                x = s * a * np.sin(phi)
                if idx == 1:
                    x *= 0.85
                if j == 0:
                    # the rib angle lies behind the tubercle
                    y = max(y, tub_y + 4)
                pts.append(np.array([x, y, zz]))
            pts_a = np.array(pts)
            rib_parts = _chain(pts_a, r_rib, cort * 0.95, canc * 0.8, 1.6)
            tags.setdefault("rib", []).extend(range(len(bones), len(bones) + len(rib_parts)))
            bones.extend(rib_parts)
            # costal cartilage to the sternum (true ribs) or the costal margin
            end = pts_a[-1]
            if idx <= 7:
                f = (idx - 1) / 6.0
                zs = sternum_top - f * (sternum_top - sternum_bot) - 5
                ys = end[1] + 3
                ster_y.append(ys)
                tgt = np.array([s * 14 * anat.extra.get("kw", 1.0), ys, zs])
            elif from_last >= 2:
                tgt = np.array([s * (25 + 12 * (idx - 8)) * k, end[1] - 5, end[2] + 40 * k])
            else:
                continue
            cart_hu = float(rng.uniform(100.0, 220.0))
            calc = float(rng.uniform(250.0, 450.0)) if rng.random() < 0.15 else cart_hu
            mid = 0.5 * (end + tgt) + np.array([0, -4, -8 * k])
            bones.extend(_chain(np.array([end, mid, tgt]), 4.2 * k, calc, cart_hu, 1.0))
    anat.extra["rib_tips"] = {v.name: None for v in ribs}

    # ---------------------------------------------------------------- sternum
    ys = float(np.mean(ster_y)) if ster_y else 0.0
    man_bot = sternum_top - 45 * k
    bones.append(
        Slab(
            (0, ys),
            (0, ys - 4),
            man_bot,
            sternum_top,
            24 * k,
            7 * k,
            cort * 0.8,
            canc,
            1.2,
            1.2,
            p=2.2,
            waist=0.1,
        )
    )
    bones.append(
        Slab(
            (0, ys + 6),
            (0, ys),
            sternum_bot - 10 * k,
            man_bot - 3,
            15 * k,
            6 * k,
            cort * 0.8,
            canc,
            1.2,
            1.2,
            p=2.2,
            waist=0.0,
            a_top=13 * k,
        )
    )

    # ---------------------------------------------------------------- shoulder girdle
    t1 = anat.vertebra("T1")
    z_sh = anat.landmarks["shoulder"]
    sec_sh = torso_section(anat, t1.zm - 20)
    x_sh = sec_sh["a_i"] + 18 * k
    y_sh = sec_sh["yc"] + 0.15 * sec_sh["b_ip"]
    anat.extra["shoulder_xy"] = (x_sh, y_sh)
    for s in (-1.0, 1.0):
        clav = np.array(
            [
                [s * 18 * k, ys - 4, sternum_top + 4],
                [s * 70 * k, ys - 8, sternum_top + 12 * k],
                [s * (x_sh - 30 * k), y_sh - 8, z_sh + 22 * k],
                [s * (x_sh - 5 * k), y_sh + 5, z_sh + 20 * k],
            ]
        )
        bones.extend(_chain(clav, 6.0 * k, cort, canc, 2.0))
        # humeral head and glenoid
        bones.append(
            Ellipsoid((s * x_sh, y_sh, z_sh), (22 * k, 22 * k, 24 * k), cort * 0.8, canc, 1.5)
        )
        # scapula: a thin triangular plate on the posterior chest wall
        z_top = z_sh + 12 * k
        z_bot = anat.vertebra("T7").zm

        def scap_path(z: float, s: float = s, z_top: float = z_top, z_bot: float = z_bot):
            f = (z - z_bot) / (z_top - z_bot)
            sec = torso_section(anat, z)
            yb = sec["yc"] + sec["b_ip"] - 12 * k
            x_med = s * (65 + 20 * f) * k
            x_lat = s * (80 + 45 * f**0.8) * k
            return np.array(
                [[x_med, yb], [0.5 * (x_med + x_lat), yb - 4], [x_lat, yb - 16 - 20 * f]]
            )

        bones.append(
            Plate(
                z_bot,
                z_top,
                scap_path,
                thickness=lambda z, u: 3.0 + 4.0 * np.asarray(u) ** 2,
                cortical=lambda z, u, c=cort: np.full_like(np.asarray(u, dtype=float), 0.75 * c),
                cancellous=canc,
            )
        )
        # scapular spine / acromion
        zsp = z_sh + 5 * k
        yb = torso_section(anat, zsp)["yc"] + torso_section(anat, zsp)["b_ip"] - 10 * k
        bones.extend(
            _chain(
                np.array(
                    [[s * 65 * k, yb, zsp - 10 * k], [s * (x_sh + 5), yb - 15, z_sh + 25 * k]]
                ),
                5.0 * k,
                cort * 0.85,
                canc,
                1.5,
            )
        )
        # arm bones
        bones.extend(_arm_bones(anat, s, x_sh, y_sh, z_sh, cort, canc, rng))

    # ---------------------------------------------------------------- sacrum, coccyx
    tilt = float(e["sac_tilt"])
    sy0 = anat.spine_y(0.0)
    seg_h = 21.0 * k
    widths = [52, 44, 36, 28, 20]
    ala = float(rng.uniform(48.0, 56.0)) * anat.extra.get("kw", 1.0)
    sacrum_start = len(bones)
    shape = e.get("sacrum_shape")
    if shape is not None:
        l5_disc = e["discs"][anat.vertebrae[0].name]
        # the sacrum's marrow is fattier than the lumbar bodies' (worker.phantom.variation)
        canc_s = canc * float(shape.get("marrow", 1.0))
        segments, s1_top, (yc, zc) = _curved_sacrum(
            sy0, seg_h, widths, k, cort, canc_s, shape, l5_disc[1] - l5_disc[0]
        )
        bones.extend(segments)
    else:
        for i in range(5):
            z1 = -i * seg_h
            z0 = z1 - seg_h + 1.0
            yc1 = sy0 + tilt * i * seg_h
            yc0 = sy0 + tilt * (i + 1) * seg_h
            bones.append(_sacral_segment(i, widths, k, cort, canc, (yc0, z0), (yc1, z1)))
        zc = -5 * seg_h
        yc = sy0 + tilt * 5 * seg_h
    # alae (lateral masses) reaching the sacro-iliac joints: on a curved sacrum a curved
    # plate from 3 mm under the S1 end plate down to S4 (_sacral_wings), else a slab
    if shape is not None:
        if "canal_depth_mm" in shape:
            bones.append(_sacral_roof(segments, s1_top - 3.0, k, cort, canc_s, shape))
        bones.append(_sacral_wings(segments, s1_top - 3.0, ala, k, cort, canc_s, shape))
    else:
        bones.append(
            Slab(
                (0, sy0 + tilt * 40 * k + 6),
                (0, sy0 + 8),
                -45 * k,
                -2.0,
                30 * k,
                16 * k,
                cort * 0.7,
                canc,
                1.2,
                1.5,
                p=2.2,
                waist=0.0,
                a_top=ala,
            )
        )
    tags["sacrum"] = list(range(sacrum_start, len(bones)))
    bones.extend(
        _chain(
            np.array([[0, yc, zc], [0, yc + 8, zc - 15 * k], [0, yc + 4, zc - 30 * k]]),
            6.0 * k,
            cort * 0.7,
            canc,
            1.0,
        )
    )
    anat.extra["ala"] = ala

    _pelvis(anat, rng, cort, canc)


class _LumbarCurve:
    """The lumbar bodies and discs of a lordotic column (``anat.extra["lordosis"]``,
    :mod:`worker.phantom.variation`): each slab's centre follows ``anat.spine_y`` from its
    bottom to its top and its end plates are perpendicular to the column there (Slab tilt =
    -dy/dz); the lowest disc sits on the inclined S1 end plate of the curved sacrum. Without
    a lordosis (the default phantom) bodies and discs stay upright, as before."""

    def __init__(self, anat: Anatomy) -> None:
        self.anat = anat
        lordosis = anat.extra.get("lordosis")
        self.top = float(lordosis["lumbar_top_mm"]) if lordosis else -np.inf
        self.s1: tuple[float, float] | None = None
        shape = anat.extra.get("sacrum_shape")
        if lordosis and shape is not None:
            slope = math.radians(shape["slope_deg"])
            l5_disc = anat.extra["discs"][anat.vertebrae[0].name]
            b0 = _sacral_half_depth(0, anat.scale) / math.cos(slope)
            # the S1 end plate through the sacrum's axis (as _curved_sacrum places it)
            self.s1 = (0.4 * (l5_disc[1] - l5_disc[0]) - math.tan(slope) * b0, math.tan(slope))

    def _tilt(self, z: float) -> float:
        if not 0.0 <= z <= self.top:
            return 0.0
        y = self.anat.spine_y
        return -(y(z + 0.5) - y(z - 0.5))

    def body(self, v: Vertebra) -> tuple[tuple[float, float], tuple[float, float]]:
        """((y at the bottom, y at the top), (bottom tilt, top tilt)) of body ``v``."""
        if v.z0 > self.top:
            return (v.cy, v.cy), (0.0, 0.0)
        y = self.anat.spine_y
        return (y(v.z0), y(v.z1)), (self._tilt(v.z0), self._tilt(v.z1))

    def disc(
        self, ys: tuple[float, float], zs: tuple[float, float], lowest: bool
    ) -> tuple[tuple[float, float], tuple[float, float], float]:
        """((y at the bottom, y at the top), (tilts), bottom z) of a disc spanning ``zs``."""
        if zs[0] > self.top:
            return ys, (0.0, 0.0), zs[0]
        y = self.anat.spine_y
        if lowest and self.s1 is not None:
            return (y(0.0), y(zs[1])), (self.s1[1], self._tilt(zs[1])), self.s1[0]
        return (y(zs[0]), y(zs[1])), (self._tilt(zs[0]), self._tilt(zs[1])), zs[0]


def _sacral_axis(segments: list[Slab]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, axial half-depth) along the curved sacrum's axis, z ascending (mm): the ends of
    the sacral bodies of :func:`_curved_sacrum`."""
    pts = sorted(
        [(b.z0, b.c0[1], b.b) for b in segments] + [(b.z1, b.c1[1], b.b) for b in segments]
    )
    return tuple(np.array([p[i] for p in pts]) for i in range(3))  # type: ignore[return-value]


def _sacral_wings(
    segments: list[Slab],
    z_top: float,
    ala: float,
    k: float,
    cort: float,
    canc: float,
    shape: dict[str, float] | None = None,
) -> Plate:
    """The curved sacrum's lateral masses: from the alae under S1 down to S4, one plate
    whose axial section is a shallow U through the sacral bodies (the pelvic surface
    concave forwards), its ends reaching the sacro-iliac joints.

    Real sacra are not a stack of bodies: below S1 the fused lateral masses make a broad,
    thin, curved plate (about 110 mm wide at S1-S2, narrowing to 30 mm at S5)
    that meets the ilia at the sacro-iliac joints, and it follows the sacrum's curve down and
    back. ``segments`` are the five sacral bodies of :func:`_curved_sacrum` (their axis gives
    the plate's midline); ``z_top`` (mm) is the alae's top; ``ala`` (mm) the half-width at
    the sacro-iliac joints. Half-width ``ala * (1 - 0.6 t)``, thickness ``(20 - 10 t) k``
    (t = 0 at the top, 1 at the bottom of S4); the ends lie 8 mm in front of the midline.

    With ``shape["mass_depth"]`` (:data:`worker.phantom.variation.SACRAL_MASS_DEPTH`) the
    plate is that fraction of the S1 body's axial depth thick beside the canal (beyond
    ``shape["canal_half_width_mm"]`` from the midline, tapering to 40 % of it at S4), its
    lateral parts moved back so that their front stays where the thin plate's was: the
    lateral masses then reach back to the dorsal wall of :func:`_sacral_roof`, flanking the
    canal.
    """
    zs, ys, _ = _sacral_axis(segments)
    z_bot = segments[3].z0
    span = max(z_top - z_bot, 1.0)
    # the S1 body's depth in an axial slice (its half-depth across the axis / cos(slope))
    deep = 0.0 if shape is None else float(shape.get("mass_depth", 0.0)) * 2 * segments[0].b
    half_canal = 0.0 if shape is None else float(shape.get("canal_half_width_mm", 0.0)) * k

    def frac(z: float) -> float:
        return float(np.clip((z_top - z) / span, 0.0, 1.0))

    def lateral(z: float, u: np.ndarray) -> np.ndarray:
        """0 in the middle (over the canal), 1 beside it (x = w (2u - 1) on the U)."""
        w = ala * (1.0 - 0.6 * frac(z))
        x = np.abs(w * (2.0 * np.asarray(u, dtype=np.float64) - 1.0))
        return np.clip((x - half_canal) / 4.0, 0.0, 1.0)

    def extra(z: float) -> float:
        """How much thicker than the thin plate the lateral masses are at ``z`` (mm)."""
        t = frac(z)
        return max(0.0, deep * (1.0 - 0.6 * t) - (20.0 - 10.0 * t) * k)

    def path(z: float) -> np.ndarray:
        t = frac(z)
        yc = float(np.interp(z, zs, ys))
        w = ala * (1.0 - 0.6 * t)
        u = np.linspace(0.0, 1.0, 9)[:, None]
        p0, p1, p2 = np.array([-w, yc - 8.0]), np.array([0.0, yc + 8.0]), np.array([w, yc - 8.0])
        pts = (1 - u) ** 2 * p0 + 2 * (1 - u) * u * p1 + u**2 * p2
        # where the plate is thicker (beside the canal) its line moves back by half the
        # extra thickness, so that its front stays where the thin plate's was
        pts[:, 1] += 0.5 * extra(z) * lateral(z, u[:, 0])
        return pts

    def thickness(z: float, u: np.ndarray) -> np.ndarray:
        base = (20.0 - 10.0 * frac(z)) * k
        return base + extra(z) * lateral(z, u) if deep else np.full(np.shape(u), base)

    def cortical(z: float, u: np.ndarray) -> np.ndarray:
        return np.full(np.shape(u), cort * 0.7)

    return Plate(z_bot, z_top, path, thickness, cortical, canc * 0.85)


def _sacral_roof(
    segments: list[Slab],
    z_top: float,
    k: float,
    cort: float,
    canc: float,
    shape: dict[str, float],
) -> Plate:
    """The curved sacrum's dorsal wall over the sacral canal, S1 to the bottom of S3.

    Behind the sacral bodies the canal (``shape["canal_depth_mm"]`` deep and
    ``shape["canal_half_width_mm"]`` to each side at S1, times the body scale ``k``; both
    narrow downwards, the depth to half and the width by 40 % at the bottom of S3) is left
    empty; the wall is a shallow inverted V of fused laminae 5 mm thick (x ``k``) from the
    canal's sides to the midline behind it, thickest (9 mm) at the median sacral crest. The
    body's posterior surface is the sacral bodies' axis plus their axial half-depth.
    """
    zs, ys, bs = _sacral_axis(segments)
    z_bot = segments[2].z0
    span = max(z_top - z_bot, 1.0)
    depth0 = float(shape["canal_depth_mm"]) * k
    half0 = float(shape["canal_half_width_mm"]) * k

    def frac(z: float) -> float:
        return float(np.clip((z_top - z) / span, 0.0, 1.0))

    def path(z: float) -> np.ndarray:
        t = frac(z)
        back = float(np.interp(z, zs, ys) + np.interp(z, zs, bs))  # the body's back
        depth, half = depth0 * (1.0 - 0.5 * t), half0 * (1.0 - 0.4 * t)
        wall = 2.5 * k  # half the wall's thickness: the canal stays clear of it
        return np.array(
            [
                [-half - wall, back + 0.3 * depth],
                [0.0, back + depth + wall],
                [half + wall, back + 0.3 * depth],
            ]
        )

    def thickness(z: float, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        return (5.0 + 4.0 * np.exp(-(((u - 0.5) / 0.12) ** 2))) * k

    def cortical(z: float, u: np.ndarray) -> np.ndarray:
        return np.full(np.shape(u), cort * 0.8)

    return Plate(z_bot, z_top, path, thickness, cortical, canc)


def _curved_sacrum(
    sy0: float,
    seg_h: float,
    widths: list[int],
    k: float,
    cort: float,
    canc: float,
    shape: dict[str, float],
    l5_disc_mm: float,
) -> tuple[list[Slab], float, tuple[float, float]]:
    """S1-S5 along the sacrum's kyphotic curve, each end plate perpendicular to it.

    The axis leaves the top of S1 down and back at ``shape["slope_deg"]`` from the vertical,
    so the S1 end plate is inclined by the sacral slope (posterior edge highest, the
    promontory lower and anterior), and turns forward by ``shape["turn_deg"]`` down to the
    lower end of S5 (the concave pelvic surface; the ranges and their source:
    ``worker.phantom.variation``). The posterior edge of S1 stays in the lower 40 % of the
    L5-S1 disc space (``l5_disc_mm`` tall, z 0 = its bottom), so S1 never touches L5.

    Returns
    -------
    (segments, s1_top_mm, (y_end_mm, z_end_mm)) : the five slabs, the z (mm) of the S1
    end plate on the axis, and the axis' lower end (where the coccyx starts).
    """
    slope = math.radians(shape["slope_deg"])
    turn = math.radians(shape["turn_deg"])
    theta = [slope - turn * j / 5 for j in range(6)]  # the axis' angle from the vertical
    b0 = _sacral_half_depth(0, k) / math.cos(theta[0])
    y, z = sy0, 0.4 * l5_disc_mm - math.tan(theta[0]) * b0
    top = z
    out = []
    for i in range(5):
        phi = 0.5 * (theta[i] + theta[i + 1])
        length = seg_h * (1 - 0.06 * i)
        y1, z1 = y + length * math.sin(phi), z - length * math.cos(phi)
        out.append(
            _sacral_segment(
                i,
                widths,
                k,
                cort,
                canc,
                (y1, z1 + 0.5),
                (y, z - 0.5),
                axis_angle=phi,
                tilts=(math.tan(theta[i + 1]), math.tan(theta[i])),
            )
        )
        y, z = y1, z1
    return out, top, (y, z)


def _sacral_half_depth(i: int, k: float) -> float:
    """Antero-posterior half-depth (mm) of sacral segment ``i`` (0 = S1) across its axis."""
    return 28 * k / 2 * (1 - i * 0.12)


def _sacral_segment(
    i: int,
    widths: list[int],
    k: float,
    cort: float,
    canc: float,
    bottom: tuple[float, float],
    top: tuple[float, float],
    axis_angle: float = 0.0,
    tilts: tuple[float, float] = (0.0, 0.0),
) -> Slab:
    """Sacral segment ``i`` (0 = S1) as a slab from ``bottom`` to ``top`` ((y, z) mm of its
    axis), tapering to ``widths[i] * k`` at the top; an axis ``axis_angle`` (radians) from
    the vertical deepens the axial section by 1 / cos, and ``tilts`` incline the bottom and
    top end planes (:class:`Slab` ``tilt0``, ``tilt1``)."""
    w = widths[i] * k
    return Slab(
        (0, bottom[0]),
        (0, top[0]),
        bottom[1],
        top[1],
        w * 0.8 / 2,
        _sacral_half_depth(i, k) / math.cos(axis_angle),
        cort * 0.7,
        canc,
        1.0,
        1.0,
        waist=0.0,
        a_top=w / 2,
        tilt0=tilts[0],
        tilt1=tilts[1],
    )


def _arm_bones(
    anat: Anatomy,
    s: float,
    x_sh: float,
    y_sh: float,
    z_sh: float,
    cort: float,
    canc: float,
    rng: np.random.Generator,
) -> list[Capsule]:
    """Humerus, radius and ulna for the arm position, and the arm axis for the soft tissue."""
    k = anat.scale
    out: list[Capsule] = []
    if anat.arms == "none":
        anat.extra.setdefault("arm_axes", [])
        return out
    if anat.arms == "down":
        gap = float(anat.extra.setdefault("arm_gap", float(rng.uniform(3.0, 30.0))))
        r_arm = 48.0 * k
        z_elb = z_sh - 300 * k
        z_wr = z_elb - 250 * k
        z_fing = z_wr - 180 * k
        x_axis = float(anat.extra.get("arm_x", 0.0)) or x_sh
        # keep the arm beside the widest part of the torso it passes
        widest = max(torso_section(anat, z)["a_o"] for z in np.linspace(z_wr, z_sh - 60, 12))
        x_axis = max(x_sh, widest + gap + r_arm)
        p_sh = np.array([s * x_sh, y_sh, z_sh])
        p_el = np.array([s * x_axis, y_sh + 10, z_elb])
        p_wr = np.array([s * (x_axis - 5), y_sh - 5, z_wr])
        p_fi = np.array([s * (x_axis - 10), y_sh - 10, z_fing])
    else:  # up, beside/above the head
        z_elb = z_sh + 270 * k
        p_sh = np.array([s * x_sh, y_sh, z_sh])
        p_el = np.array([s * (x_sh - 10 * k), y_sh + 10, z_elb])
        p_wr = np.array([s * 30 * k, y_sh - 20, z_elb + 150 * k])
        p_fi = np.array([-s * 40 * k, y_sh - 20, z_elb + 180 * k])
        anat.z_top = max(anat.z_top, float(p_wr[2] + 80 * k))
    out.append(Capsule(tuple(p_sh), tuple(p_el), 11 * k, 9 * k, cort, -40.0, 4.0))
    d = np.array([0, 8.0 * k, 0])
    out.append(Capsule(tuple(p_el + d), tuple(p_wr + d), 7.5 * k, 8 * k, cort, -20.0, 3.0))
    out.append(Capsule(tuple(p_el - d), tuple(p_wr - d), 8 * k, 6 * k, cort, -20.0, 3.0))
    out.append(Capsule(tuple(p_wr), tuple(p_fi), 10 * k, 6 * k, cort * 0.6, canc, 2.0))
    anat.extra.setdefault("arm_axes", []).append((p_sh, p_el, p_wr, p_fi))
    return out


def _pelvis(anat: Anatomy, rng: np.random.Generator, cort: float, canc: float) -> None:
    """Iliac wings with a bright crest, acetabula, pubic/ischial rami, femora."""
    k = anat.scale
    kw = anat.extra.get("kw", 1.0)
    lm = anat.landmarks
    z_crest = lm["iliac_crest_top"]
    z_fh = lm["femoral_head_centre"]
    r_fh = float(anat.extra["r_fh"])
    x_fh = float(anat.extra["x_fh"])
    ala = float(anat.extra["ala"])
    x_crest = float(rng.uniform(120.0, 145.0)) * (x_fh / 88.0)
    x_asis = x_crest * float(rng.uniform(0.85, 0.95))
    z_acet = z_fh + r_fh * 0.7
    arch = float(rng.uniform(22.0, 35.0)) * k  # PSIS/ASIS lie this much below the crest top
    crest_hu = cort * float(rng.uniform(1.0, 1.25))
    wing_hu = cort * float(rng.uniform(0.72, 0.95))
    z_si = -45.0 * k
    sy0 = anat.spine_y(0.0)
    tilt = float(anat.extra["sac_tilt"])
    bones = anat.bones

    for s in (-1.0, 1.0):

        def path(z: float, s: float = s) -> np.ndarray:
            f = float(np.clip((z - z_acet) / (z_crest - z_acet), 0.0, 1.0))
            sec = torso_section(anat, min(z, z_crest))
            y_post = sy0 + tilt * max(0.0, -z) * 0.6 + 10 * k
            y_ant = sec["yc"] - 0.35 * sec["b_ca"]
            # medial border: sacro-iliac joint above z_si, then the pelvic brim to the acetabulum
            g = float(np.clip((z - z_acet) / max(z_si - z_acet, 1.0), 0.0, 1.0))
            x_med = x_fh - 28 + (ala - 2 - (x_fh - 28)) * g**0.8
            p_post = np.array([s * x_med, y_post + 8 * (1 - f)])
            p_ant = np.array([s * (x_fh + 5 + (x_asis - x_fh - 5) * f**0.5), y_ant - 10 * f])
            x_lat = x_fh + 12 + (x_crest - x_fh - 12) * f**0.4
            apex = np.array([s * x_lat, 0.5 * (p_post[1] + p_ant[1]) + 10])
            ctrl = 2 * apex - 0.5 * (p_post + p_ant)
            t = np.linspace(0, 1, 9)[:, None]
            return (1 - t) ** 2 * p_post + 2 * (1 - t) * t * ctrl + t**2 * p_ant

        def top(u: np.ndarray) -> np.ndarray:
            return z_crest - arch * np.square(2 * np.asarray(u) - 1.0)

        def thickness(z: float, u: np.ndarray) -> np.ndarray:
            f = float(np.clip((z - z_acet) / (z_crest - z_acet), 0.0, 1.0))
            rim = np.exp(-np.clip(top(u) - z, 0, None) / 8.0)
            edge = np.exp(-np.minimum(u, 1 - u) / 0.08)
            return 4.0 + 7.0 * rim + 4.0 * edge + 22.0 * (1 - f) ** 3

        def cortical(z: float, u: np.ndarray) -> np.ndarray:
            rim = np.exp(-np.clip(top(u) - z, 0, None) / 6.0)
            edge = np.exp(-np.minimum(u, 1 - u) / 0.1)
            return wing_hu + (crest_hu - wing_hu) * np.maximum(rim, 0.6 * edge)

        def visible(z: float, u: np.ndarray) -> np.ndarray:
            return np.clip((top(u) - z) / 2.0 + 0.5, 0.0, 1.0)

        bones.append(Plate(z_acet - 10, z_crest, path, thickness, cortical, canc, visible))
        # acetabular roof: hollow sphere around the femoral head (upper half)
        bones.append(
            Ellipsoid(
                (s * (x_fh - 4), 0.0 + _hip_y(anat), z_fh + 4),
                (r_fh + 9, r_fh + 9, r_fh + 12),
                cort * 0.9,
                canc,
                2.0,
                hollow_mm=8.0,
                z_from=z_fh - 0.2 * r_fh,
            )
        )
        # ilium body between acetabulum and the sacro-iliac joint
        yh = _hip_y(anat)
        bones.append(
            Capsule(
                (s * (x_fh - 8), yh + 5, z_acet + 5),
                (s * (ala - 2), sy0 + 25 * k, -35 * k),
                13 * k,
                11 * k,
                cort * 0.85,
                canc,
                2.0,
            )
        )
        # pubic and ischial rami around the obturator foramen
        y_sym = yh - 45 * k
        z_sym = z_fh - 12 * k
        ring = np.array(
            [
                [s * (x_fh - 20), yh - 15, z_fh + 8],
                [s * 40 * kw, y_sym + 5, z_sym + 8],
                [s * 12 * kw, y_sym, z_sym],
                [s * 16 * kw, y_sym + 5, z_sym - 30 * k],
                [s * (x_fh - 38), yh + 25, z_fh - 55 * k],
                [s * (x_fh - 22), yh + 30, z_fh - 35 * k],
                [s * (x_fh - 12), yh + 15, z_fh - 5],
            ]
        )
        radii = np.array([9, 8, 9, 7, 10, 9, 10]) * k
        bones.extend(_chain(ring, radii, cort * 0.9, canc, 2.0))
        # femur: head, neck, greater trochanter, shaft
        metal = bool(anat.extra.get("metal_hip_side") == s)
        head_cort = 3000.0 if metal else cort * 0.8
        bones.append(
            Ellipsoid(
                (s * x_fh, yh, z_fh), (r_fh, r_fh, r_fh), head_cort, 3000.0 if metal else canc, 1.5
            )
        )
        gt = np.array([s * (x_fh + 42 * k), yh + 8, z_fh - 22 * k])
        bones.append(
            Capsule(
                (s * x_fh, yh, z_fh),
                tuple(gt),
                15 * k,
                15 * k,
                3000.0 if metal else cort * 0.8,
                3000.0 if metal else canc,
                2.0,
            )
        )
        bones.append(
            Ellipsoid(
                tuple(gt + np.array([s * 2, 0, 4])),
                (16 * k, 18 * k, 22 * k),
                cort * 0.75,
                canc,
                1.5,
            )
        )
        knee = np.array([s * (x_fh - 5), yh - 5, lm["knee"]])
        bones.append(
            Capsule(
                tuple(gt - np.array([s * 8, 0, 10 * k])),
                tuple(knee),
                15 * k,
                13 * k,
                cort * 1.05,
                -30.0,
                5.5 * k,
            )
        )
        bones.append(
            Ellipsoid(
                (s * (x_fh + 10 * k), yh + 15, z_fh - 55 * k),
                (9 * k, 9 * k, 12 * k),
                cort * 0.7,
                canc,
                1.5,
            )
        )  # lesser trochanter
        if metal:
            bones.append(
                Capsule(
                    tuple(gt),
                    tuple(gt + np.array([-s * 10, 0, -150 * k])),
                    8 * k,
                    6 * k,
                    3000.0,
                    3000.0,
                    2.0,
                )
            )
    _ = kw


def _hip_y(anat: Anatomy) -> float:
    """y (mm) of the femoral heads: a little anterior of the sacral promontory."""
    z = anat.landmarks["femoral_head_centre"]
    sec = torso_section(anat, z)
    return sec["yc"] + 0.15 * sec["b_ip"]
