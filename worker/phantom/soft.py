"""Soft tissue of the phantom outside the torso profiles: organs, vessels, bowel, limbs, head.

The torso itself (skin, SAT, muscle wall, cavity, paraspinal muscles, lungs, liver) is drawn
per slice by :mod:`worker.phantom.render` from the profiles in :mod:`worker.phantom.anatomy`;
this module places the discrete structures (body frame, mm).
"""

from __future__ import annotations

import numpy as np

from worker.phantom import anatomy as tc
from worker.phantom.anatomy import Anatomy, SoftPart, torso_section
from worker.phantom.primitives import Capsule, Ellipsoid
from worker.phantom.skeleton import _chain, _hip_y


def _caps(pts: np.ndarray, r: float | np.ndarray) -> list[Capsule]:
    return _chain(np.asarray(pts, dtype=float), r, 0.0, 0.0)


def build_soft(
    anat: Anatomy, rng: np.random.Generator, *, table: bool | None, metal: bool | None
) -> None:
    """Fill ``anat.soft_before``, ``anat.soft_after``, ``anat.table`` and metal/calcifications."""
    k = anat.scale
    kw = float(anat.extra["kw"])
    lm = anat.landmarks
    mus = float(anat.extra["mus"])
    sat = anat.extra["sat"]
    before = anat.soft_before
    after = anat.soft_after
    verts = anat.vertebrae
    vz = {v.name: v for v in verts}
    x_fh = float(anat.extra["x_fh"])
    yh = _hip_y(anat)

    # ------------------------------------------------------------ thighs
    th_top = lm["perineum"] + 70 * k
    r_mus_th = 60 * k * mus**0.5
    r_fat_th = r_mus_th + 0.9 * sat["lat"] + 2
    for s in (-1.0, 1.0):
        axis = np.array([[s * (x_fh - 2), yh + 8, th_top], [s * (x_fh - 12), yh, lm["knee"] - 60]])
        for c in _caps(axis, [r_fat_th, r_fat_th * 0.7]):
            before.append(SoftPart(c, tc.SAT))
        for c in _caps(axis, [r_mus_th, r_mus_th * 0.7]):
            before.append(SoftPart(c, tc.MUSCLE))

    # ------------------------------------------------------------ breasts
    if anat.sex == "F":
        t5 = vz["T5"]
        sec = torso_section(anat, t5.z0)
        size = float(rng.uniform(0.5, 1.5)) * (1 + sat["ant"] / 40)
        for s in (-1.0, 1.0):
            before.append(
                SoftPart(
                    Ellipsoid(
                        (s * 70 * kw, sec["yc"] - sec["b_oa"] + 10, t5.z0 - 10 * k),
                        (55 * k * size**0.4, 40 * size**0.6, 55 * k * size**0.4),
                    ),
                    tc.SAT,
                )
            )

    # ------------------------------------------------------------ neck and head
    c1 = verts[-1]
    t1 = vz["T1"]
    z_sb = lm["skull_base"]
    ny = anat.spine_y(vz["C4"].zm) - 12
    neck = np.array([[0, ny + 5, t1.z0], [0, ny, z_sb + 20]])
    for c in _caps(neck, 60 * kw + 0.4 * sat["lat"]):
        before.append(SoftPart(c, tc.SAT))
    for c in _caps(neck, 52 * kw * mus**0.5):
        before.append(SoftPart(c, tc.MUSCLE))
    for c in _caps(np.array([[0, ny - 18, t1.z0], [0, ny - 20, z_sb - 30]]), 9 * k):
        before.append(SoftPart(c, tc.AIR))
    hc = (0.0, anat.spine_y(c1.zm) - 15, z_sb + 45 * k)
    hr = (72 * kw, 92 * k, (lm["vertex"] - z_sb - 45 * k))
    before.append(SoftPart(Ellipsoid(hc, hr), tc.SKIN))
    before.append(SoftPart(Ellipsoid(hc, (hr[0] - 8, hr[1] - 8, hr[2] - 8)), tc.BRAIN))
    anat.bones.append(
        Ellipsoid(
            hc,
            (hr[0] - 4, hr[1] - 4, hr[2] - 4),
            anat.extra["cort"],
            anat.extra["canc"],
            2.0,
            hollow_mm=7.0,
        )
    )

    # ------------------------------------------------------------ arms (soft tissue)
    arm_sat = 0.6 * sat["lat"] + 2
    for p_sh, p_el, p_wr, p_fi in anat.extra.get("arm_axes", []):
        pts = np.array([p_sh, p_el, p_wr, p_fi])
        mus_r = np.array([40, 34, 22, 18]) * k * mus**0.5
        for c in _caps(pts, mus_r + arm_sat):
            before.append(SoftPart(c, tc.ARM_FAT))
        for c in _caps(pts, mus_r):
            before.append(SoftPart(c, tc.ARM_MUSCLE))
        before.append(SoftPart(Ellipsoid(tuple(p_sh), (45 * k, 45 * k, 50 * k)), tc.ARM_MUSCLE))

    # ------------------------------------------------------------ bowel (drawn first, organs over)
    l1, l3 = vz["L1"], vz["L3"]
    z_crest = lm["iliac_crest_top"]
    oral = bool(anat.variants["oral_contrast"])
    n_loops = int(rng.integers(25, 55))
    for _ in range(n_loops):
        z = float(rng.uniform(lm["femoral_head_centre"] + 20, l1.z1))
        sec = torso_section(anat, z)
        x = float(rng.uniform(-0.75, 0.75)) * sec["a_c"]
        y = sec["yc"] - float(rng.uniform(0.1, 0.85)) * sec["b_ca"]
        r = float(rng.uniform(10.0, 18.0)) * k
        rz = r * float(rng.uniform(0.8, 2.2))
        content = int(
            rng.choice(
                [tc.FLUID, tc.GAS, tc.CONTRAST if oral else tc.FLUID, tc.FECES],
                p=[0.35, 0.25, 0.3, 0.1],
            )
        )
        after.append(SoftPart(Ellipsoid((x, y, z), (r, r, rz)), tc.BOWEL_WALL, "abdomen"))
        after.append(
            SoftPart(Ellipsoid((x, y, z), (r - 2.5, r - 2.5, rz - 2.5)), content, "abdomen")
        )
    # colon frame: caecum/ascending (right), transverse, descending (left), sigmoid, rectum
    sec3 = torso_section(anat, l3.zm)
    ac = sec3["a_c"]
    yl = sec3["yc"] - 0.15 * sec3["b_ca"]
    ya = sec3["yc"] - 0.75 * sec3["b_ca"]
    sag = float(rng.uniform(0.0, 80.0)) * k
    colon = np.array(
        [
            [-0.72 * ac, yl, z_crest - 40 * k],
            [-0.78 * ac, yl, l1.zm],
            [-0.45 * ac, ya, l1.zm - 10],
            [0.0, ya, l1.zm - 20 - sag],
            [0.45 * ac, ya, l1.zm],
            [0.78 * ac, yl + 10, l1.z1 + 20 * k],
            [0.8 * ac, yl + 10, z_crest - 20 * k],
            [0.3 * ac, yl - 20, lm["femoral_head_centre"] + 40 * k],
            [0.0, anat.spine_y(-80 * k) - 35 * k, -80 * k],
            [0.0, anat.spine_y(-120 * k) - 30 * k, lm["perineum"] + 10],
        ]
    )
    rc = np.array([28, 25, 24, 24, 23, 20, 18, 16, 18, 16]) * k
    colon_content = int(
        rng.choice([tc.GAS, tc.FECES, tc.CONTRAST if oral else tc.FECES], p=[0.45, 0.4, 0.15])
    )
    for c in _caps(colon, rc):
        after.append(SoftPart(c, tc.BOWEL_WALL, "abdomen"))
    for c in _caps(colon, rc - 3):
        after.append(SoftPart(c, colon_content, "abdomen"))
    # stomach under the left dome
    zl = anat.dome["left"]
    sec_s = torso_section(anat, zl - 60 * k)
    st_c = (0.35 * sec_s["a_c"], sec_s["yc"] - 0.45 * sec_s["b_ca"], zl - 60 * k)
    st_r = (55 * k, 42 * k, 70 * k)
    after.append(SoftPart(Ellipsoid(st_c, st_r), tc.BOWEL_WALL, "abdomen"))
    after.append(
        SoftPart(
            Ellipsoid(st_c, (st_r[0] - 4, st_r[1] - 4, st_r[2] - 4)),
            tc.CONTRAST if oral else tc.FLUID,
            "abdomen",
        )
    )
    after.append(
        SoftPart(
            Ellipsoid((st_c[0], st_c[1] - 25 * k, st_c[2] + 20 * k), (40 * k, 20 * k, 40 * k)),
            tc.GAS,
            "abdomen",
        )
    )
    # bladder and rectum
    z_fh = lm["femoral_head_centre"]
    sec_p = torso_section(anat, z_fh)
    fill = float(rng.uniform(0.5, 1.3))
    after.append(
        SoftPart(
            Ellipsoid(
                (0.0, sec_p["yc"] - 0.45 * sec_p["b_ca"], z_fh + 5 * k),
                (45 * k * fill, 35 * k * fill, 38 * k * fill),
            ),
            tc.BLADDER,
            "cavity",
        )
    )

    # ------------------------------------------------------------ liver is drawn by rule (render)
    anat.extra["liver_tip_z"] = float(rng.uniform(l3.zm, vz["L1"].zm))
    anat.extra["liver_left_x"] = float(rng.uniform(0.05, 0.45))
    # spleen
    sec_sp = torso_section(anat, zl - 55 * k)
    sp = float(rng.uniform(0.8, 1.3))
    after.append(
        SoftPart(
            Ellipsoid(
                (0.7 * sec_sp["a_c"], sec_sp["yc"] + 0.55 * sec_sp["b_cp"], zl - 55 * k),
                (28 * k, 45 * k * sp, 55 * k * sp),
            ),
            tc.SPLEEN,
            "abdomen",
        )
    )
    # kidneys (right lower than left)
    for s, zk in ((-1.0, vz["L2"].z1), (1.0, l1.zm)):
        v = vz["L1"]
        c = (s * (v.width / 2 + 45 * k), anat.spine_y(zk) + 12 * k, zk)
        after.append(SoftPart(Ellipsoid(c, (28 * k, 24 * k, 55 * k)), tc.KIDNEY))
        after.append(
            SoftPart(
                Ellipsoid((c[0] - s * 4, c[1] - 2, c[2]), (15 * k, 12 * k, 38 * k)),
                tc.KIDNEY_MEDULLA,
            )
        )

    # ------------------------------------------------------------ great vessels
    z_bif = vz["L4"].zm + float(rng.uniform(-20.0, 20.0)) * k if "L4" in vz else vz["L3"].z0
    t4, t8 = vz["T4"], vz["T8"]
    r_ao = float(rng.uniform(10.0, 14.0)) * k
    desc = []
    for v in [x for x in verts if x.region in "TL"]:
        if v.zm > t4.zm or v.zm < z_bif:
            continue
        off = 22 * k if v.region == "T" else 12 * k
        yoff = 5.0 if v.region == "T" else -(r_ao + 3)
        desc.append([v.cx + off, v.cy - v.depth / 2 + yoff + (0 if v.region == "T" else 0), v.zm])
    desc = sorted(desc, key=lambda p: p[2])
    sec4 = torso_section(anat, t4.zm)
    arch = [
        [10 * k, sec4["yc"] - 0.45 * sec4["b_ca"], t4.zm + 10 * k],
        [15 * k, sec4["yc"] - 0.1 * sec4["b_ca"], t4.zm + 25 * k],
    ]
    asc_base = [15 * k, torso_section(anat, t8.zm)["yc"] - 0.45 * sec4["b_ca"], t8.zm + 20 * k]
    aorta = np.array([[desc[0][0], desc[0][1], z_bif], *desc, *arch[::-1], asc_base])
    for c in _caps(aorta, r_ao):
        after.append(SoftPart(c, tc.BLOOD))
    anat.extra["aorta"] = aorta
    for s in (-1.0, 1.0):
        il = np.array(
            [
                aorta[0],
                [s * 45 * k, aorta[0][1] + 5, 0.0],
                [s * (x_fh - 25), yh - 40 * k, z_fh + 25 * k],
                [s * (x_fh - 15), yh - 45 * k, z_fh - 60 * k],
            ]
        )
        for c in _caps(il, [r_ao * 0.6, r_ao * 0.55, r_ao * 0.5, r_ao * 0.45]):
            after.append(SoftPart(c, tc.BLOOD))
    ivc = np.array(
        [
            [v.cx - 22 * k, v.cy - v.depth / 2 - 10 * k, v.zm]
            for v in verts
            if v.region in "TL" and z_bif - 30 < v.zm < t8.zm
        ]
    )
    for c in _caps(ivc, 11 * k):
        after.append(SoftPart(c, tc.BLOOD))
    # heart on the left dome
    sec_h = torso_section(anat, zl + 45 * k)
    after.append(
        SoftPart(
            Ellipsoid(
                (22 * k, sec_h["yc"] - 0.4 * sec_h["b_ca"], zl + 50 * k), (62 * k, 50 * k, 58 * k)
            ),
            tc.HEART,
            "cavity",
        )
    )
    # trachea down to the carina
    t5 = vz["T5"]
    tr = np.array(
        [[0, anat.spine_y(t1.z1) - 25 * k, t1.z1 + 30], [0, t5.cy - t5.depth / 2 - 15 * k, t5.zm]]
    )
    for c in _caps(tr, 9 * k):
        after.append(SoftPart(c, tc.AIR))
    for s in (-1.0, 1.0):
        for c in _caps(np.array([tr[-1], tr[-1] + np.array([s * 40 * k, 5, -25 * k])]), 6 * k):
            after.append(SoftPart(c, tc.AIR))

    # ------------------------------------------------------------ muscles: psoas, iliacus, QL
    ala = float(anat.extra["ala"])
    lumbar = [v for v in verts if v.region == "L"][::-1]  # L1 first
    for s in (-1.0, 1.0):
        pts, rad = [], []
        for i, v in enumerate(lumbar):
            f = i / max(len(lumbar) - 1, 1)
            r = (5 + 14 * f) * k * mus
            pts.append([v.cx + s * (v.width / 2 + r * 0.7), v.cy + 2, v.zm])
            rad.append(r)
        pts += [
            [s * (ala - 5), anat.spine_y(-15) - 30 * k, -15 * k],
            [s * (x_fh - 30), yh - 35 * k, z_fh + 30 * k],
            [s * (x_fh + 5), yh + 10, z_fh - 55 * k],
        ]
        rad += [21 * k * mus, 19 * k * mus, 11 * k]
        for c in _caps(np.array(pts[::-1]), np.array(rad[::-1])):
            after.append(SoftPart(c, tc.MUSCLE))
        # iliacus along the inner face of the iliac wing
        sec_c = torso_section(anat, z_crest - 25 * k)
        ili = np.array(
            [
                [s * 0.8 * sec_c["a_c"], sec_c["yc"] - 0.05 * sec_c["b_ca"], z_crest - 15 * k],
                [s * (x_fh - 30), yh - 35 * k, z_fh + 30 * k],
            ]
        )
        for c in _caps(ili, [18 * k * mus, 17 * k * mus]):
            after.append(SoftPart(c, tc.MUSCLE))
        # quadratus lumborum: last rib to crest, in front of the transverse-process tips
        lr = anat.last_rib_vertebra()
        ql = np.array(
            [
                [lr.cx + s * 60 * k, lr.cy + lr.depth / 2 + 12 * k, lr.zm],
                [s * 70 * k, anat.spine_y(z_crest) + 30 * k, z_crest - 5 * k],
            ]
        )
        for c in _caps(ql, [10 * k * mus, 16 * k * mus]):
            after.append(SoftPart(c, tc.MUSCLE))
    # spinal canal (CSF) behind the vertebral bodies
    canal = np.array([[v.cx, v.cy + v.depth / 2 + 8 * k, v.zm] for v in verts if v.region in "CTL"])
    for c in _caps(canal, 7.5 * k):
        after.append(SoftPart(c, tc.CSF))

    # ------------------------------------------------------------ calcified aortic plaques
    n_calc = int(rng.poisson(max(0.0, (anat.age - 45) / 2.0)))
    for _ in range(n_calc):
        i = int(rng.integers(0, len(aorta) - 1))
        t = float(rng.random())
        p = aorta[i] + t * (aorta[i + 1] - aorta[i])
        ang = float(rng.uniform(0, 2 * np.pi))
        q = p + np.array([np.cos(ang) * r_ao, np.sin(ang) * r_ao, 0])
        ln = float(rng.uniform(1.0, 6.0))
        anat.bones.append(
            Capsule(
                tuple(q),
                tuple(q + np.array([0, 0, ln])),
                1.5,
                1.5,
                float(rng.uniform(300, 900)),
                float(rng.uniform(300, 900)),
                1.0,
            )
        )

    # ------------------------------------------------------------ spinal hardware
    if anat.extra.get("metal_kind") == "spine":
        lo = int(rng.integers(0, 2))
        levels = [v for v in verts if v.region == "L"][lo : lo + 3]  # from the bottom
        for s in (-1.0, 1.0):
            pts = np.array(
                [[v.cx + s * 0.33 * v.width, v.cy + v.depth / 2 + 22 * k, v.zm] for v in levels]
            )
            anat.bones.extend(_chain(pts, 3.0, 3000.0, 3000.0))
            for v in levels:
                anat.bones.append(
                    Capsule(
                        (v.cx + s * 0.33 * v.width, v.cy + v.depth / 2 + 22 * k, v.zm),
                        (v.cx + s * 0.15 * v.width, v.cy - 0.1 * v.depth, v.zm),
                        3.0,
                        3.0,
                        3000.0,
                        3000.0,
                        1.0,
                    )
                )

    # ------------------------------------------------------------ table
    if table is None:
        table = bool(rng.random() < 0.92)
    if table:
        zs = np.linspace(lm["perineum"], t1.z1, 40)
        back = max(torso_section(anat, z)["yc"] + torso_section(anat, z)["b_op"] for z in zs)
        back = max(back, yh + 8 + r_fat_th)
        pad = float(rng.choice([0.0, float(rng.uniform(5.0, 40.0))], p=[0.4, 0.6]))
        anat.table = {
            "y_top": back + pad,
            "pad": pad,
            "thickness": float(rng.uniform(12.0, 45.0)),
            "half_width": float(rng.uniform(190.0, 260.0)),
            "curvature": float(rng.uniform(0.0, 0.0012)),
            "shell": float(rng.uniform(1.5, 4.0)),
            "rails": float(rng.random() < 0.3),
        }
        if anat.table["rails"]:
            y_r = anat.table["y_top"] + 0.6 * anat.table["thickness"]
            hw = anat.table["half_width"] - 8
            for s in (-1.0, 1.0):
                anat.bones.append(
                    Capsule(
                        (s * hw, y_r, anat.z_bottom - 500),
                        (s * hw, y_r, anat.z_top + 500),
                        5.0,
                        5.0,
                        2500.0,
                        2500.0,
                        2.0,
                    )
                )
