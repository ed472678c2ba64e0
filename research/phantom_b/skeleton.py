"""Style B bones: vertebral bodies as waisted rounded boxes, posterior arches as arcs of a
tube, processes and ribs as tubes along Bezier curves, the sacrum as a tapered wedge, the
iliac wings as curved shells with a tube along the crest, femoral heads as balls.

Sizes from ``/work/shared/ANATOMY.md``, scaled by the patient's ``k`` (length) and ``kw``
(width). Appends :class:`~research.phantom_b.body.Tube` and
:class:`~research.phantom_b.body.Solid` objects to the body.
"""

from __future__ import annotations

import numpy as np

from research.phantom_b.body import Body, Level, Solid, Tube


def bezier(ctrl: np.ndarray, n: int = 48) -> np.ndarray:
    """Points (n, 3) of the cubic Bezier curve with control points ``ctrl`` (4, 3)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = ctrl
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _line(a, b, ra: float, rb: float, kind: str, owner: str = "", n: int = 8) -> Tube:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) * np.asarray(a, float) + t * np.asarray(b, float)
    return Tube(pts, np.linspace(ra, rb, n), kind, owner)


def torso_centre_y(body: Body, z: float | np.ndarray) -> float | np.ndarray:
    """y (mm) of the torso outline's centre at z: the spine lies in its posterior half."""
    return 0.6 * body.spine_y(z) - 0.4 * body.core_b(z)


def _vertebra(body: Body, lv: Level, rng: np.random.Generator) -> None:
    u = rng.uniform
    kw, h = body.kw, lv.z1 - lv.z0
    body.solids.append(
        Solid(
            "rbox",
            {
                "z0": lv.z0,
                "z1": lv.z1,
                "x": lv.x,
                "y": lv.y,
                "hw": lv.width / 2,
                "hd": lv.depth / 2,
                "corner": 0.33 * min(lv.width, lv.depth) / 2 * 2,
                "waist": u(0.04, 0.09),
            },
        )
    )
    canal = {"L": 10.5, "T": 8.0, "C": 8.5}[lv.region] * kw
    ra = {"L": 4.5, "T": 3.4, "C": 3.0}[lv.region] * kw
    yc = lv.y + lv.depth / 2 + canal
    ang = np.linspace(-0.35, np.pi + 0.35, 20)
    for dz in (-0.18 * h, 0.18 * h):
        pts = np.stack(
            [
                lv.x + (canal + ra) * np.cos(ang),
                yc + (canal + ra) * np.sin(ang),
                np.full_like(ang, lv.zm + dz),
            ],
            axis=1,
        )
        body.tubes.append(Tube(pts, np.full(len(ang), ra), "arch", lv.name))
    back = (lv.x, yc + canal + ra, lv.zm)
    if lv.region == "L":
        tip, r0, r1 = (lv.x, back[1] + u(26, 34) * kw, lv.zm - u(4, 10) * body.k), 5.0, 3.8
    elif lv.region == "T":
        tip, r0, r1 = (lv.x, back[1] + u(22, 30) * kw, lv.zm - u(15, 28) * body.k), 3.6, 2.6
    else:
        tip, r0, r1 = (lv.x, back[1] + 18 * kw, lv.zm - 5 * body.k), 3.0, 2.5
    body.tubes.append(_line(back, tip, r0 * kw, r1 * kw, "process", lv.name))
    # transverse processes: lumbar long and horizontal, thoracic short and backwards
    for s in (-1.0, 1.0):
        root = (lv.x + s * 0.45 * lv.width, lv.y + lv.depth / 2 + 5, lv.zm + 0.1 * h)
        if lv.region == "L":
            tip = (lv.x + s * lv.tp_half, lv.y + lv.depth / 2 + u(6, 12), lv.zm + 0.05 * h)
            body.tubes.append(_line(root, tip, 4.6 * kw, 2.6 * kw, "process", lv.name))
        elif lv.region == "T":
            tip = (lv.x + s * lv.tp_half, lv.y + lv.depth / 2 + 20 * kw, lv.zm + 0.25 * h)
            body.tubes.append(_line(root, tip, 4.0 * kw, 3.0 * kw, "process", lv.name))
        else:
            tip = (lv.x + s * lv.tp_half, lv.y, lv.zm)
            body.tubes.append(_line(root, tip, 3.0 * kw, 2.5 * kw, "process", lv.name))


def _rib(body: Body, lv: Level, i: int, rng: np.random.Generator) -> None:
    """Both ribs of thoracic level i (1..n) as two cubic Bezier segments each."""
    u = rng.uniform
    n = body.n_rib_pairs
    k, kw = body.k, body.kw
    z_head = lv.z1 + 1.0
    a = float(body.core_a(z_head)) * float(np.interp(i, [1, 3, 7, n], [0.5, 0.8, 0.9, 0.86]))
    b = float(body.core_b(z_head)) * float(np.interp(i, [1, 3, 7, n], [0.55, 0.8, 0.9, 0.88]))
    yc = float(torso_centre_y(body, z_head))
    step = 26.0 * k
    drop = float(np.interp(i / n, [1 / n, 0.35, 0.75, 1.0], [1.2, 3.0, 3.5, 2.6])) * step
    drop *= u(0.85, 1.15)
    x_end = float(np.interp(i, [1, 4, 7, 10], [0.3, 0.35, 0.5, 0.65])) * a
    t_end = 1.0
    if i == n:  # shortest floating rib, posterolateral, slopes down and out
        t_end = u(0.28, 0.36)
        drop = u(30.0, 50.0) * k / t_end**1.6
    elif i == n - 1:  # to about the mid-axillary line
        t_end = u(0.5, 0.62)
        drop = u(40.0, 65.0) * k / t_end**1.6
    r = u(4.0, 5.5) * kw * (0.85 if i in (1, n) else 1.0)
    for s in (-1.0, 1.0):
        head = np.array([lv.x + s * (lv.width / 2 + 2), lv.y + 0.25 * lv.depth, 0.0])
        seg1 = np.array(
            [
                head,
                [lv.x + s * (lv.tp_half + 10 * kw), lv.y + lv.depth / 2 + 28 * kw, 0.0],
                [s * 0.95 * a, yc + 0.9 * b, 0.0],
                [s * a, yc, 0.0],
            ]
        )
        seg2 = np.array(
            [
                [s * a, yc, 0.0],
                [s * a, yc - 0.6 * b, 0.0],
                [s * (x_end + 0.35 * a), yc - 1.0 * b, 0.0],
                [s * x_end, yc - 0.97 * b, 0.0],
            ]
        )
        pts = np.concatenate([bezier(seg1), bezier(seg2)[1:]])
        seg = np.linalg.norm(np.diff(pts[:, :2], axis=0), axis=1)
        t = np.concatenate([[0.0], np.cumsum(seg)]) / max(seg.sum(), 1e-6)
        pts[:, 2] = z_head + 4.0 * k * np.sin(np.pi * t) * (1 - t) - drop * t**1.6
        keep = t <= t_end
        body.tubes.append(Tube(pts[keep], np.full(int(keep.sum()), r), "rib", lv.name))


def _pelvis(body: Body, rng: np.random.Generator) -> None:
    u = rng.uniform
    k, kw = body.k, body.kw
    y0 = float(body.spine_y(0.0))
    sac_len = u(95.0, 115.0) * k
    body.solids.append(
        Solid(
            "wedge",
            {
                "z_top": 0.0,
                "z_bot": -sac_len,
                "x": 0.0,
                "y": y0,
                "tilt": u(0.45, 0.75),
                "w_top": u(48.0, 56.0) * kw,
                "w_bot": 10.0 * kw,
                "d_top": 17.0 * kw,
                "d_bot": 7.0 * kw,
            },
        )
    )
    tail = (0.0, y0 + 0.75 * sac_len + 10, -sac_len)
    body.tubes.append(_line(tail, (0.0, tail[1] + 5, -sac_len - 30 * k), 5.0, 3.0, "pelvis"))
    y_fem = y0 - u(20.0, 32.0) * kw
    fz, fx, fr = body.femoral_z, body.femoral_x, body.femoral_r
    r_crest = u(80.0, 100.0) * kw
    thick = u(6.0, 10.0)
    zb = fz + fr + 18.0 * k
    for s in (-1.0, 1.0):
        xc = body.crest_x - r_crest
        yw = y0 + u(-5.0, 8.0)
        wing = {
            "side": s,
            "xc": xc,
            "yc": yw,
            "r_top": r_crest,
            "r_bot": 0.55 * r_crest,
            "z_top": body.crest_z,
            "z_bot": zb,
            "psi_post": u(1.05, 1.25),
            "psi_ant": -u(0.9, 1.1),
            "psi_peak": u(0.2, 0.45),
            "sag": u(18.0, 28.0) * k,
            "thick": thick,
        }
        body.solids.append(Solid("wing", wing))
        # bright cortical rim along the crest
        psi = np.linspace(wing["psi_ant"], wing["psi_post"], 40)
        z_rim = body.crest_z - wing["sag"] * ((psi - wing["psi_peak"]) / 1.1) ** 2
        rim = np.stack(
            [s * (xc + r_crest * np.cos(psi)), yw + r_crest * np.sin(psi), z_rim - 3.0], axis=1
        )
        body.tubes.append(Tube(rim, np.full(len(psi), u(4.0, 5.5)), "pelvis"))
        # iliac body down to the acetabulum, sacro-iliac joint
        low = (s * (xc + 0.55 * r_crest * np.cos(0.2)), yw + 0.55 * r_crest * np.sin(0.2), zb)
        body.tubes.append(_line(low, (s * fx, y_fem, fz + fr * 0.6), 14.0, 16.0, "pelvis"))
        body.tubes.append(
            _line(
                (s * 40 * kw, y0 + 8, -20 * k),
                (
                    s * (xc + r_crest * np.cos(1.1)),
                    yw + r_crest * np.sin(1.1),
                    body.crest_z - 35 * k,
                ),
                9.0,
                7.0,
                "pelvis",
            )
        )
        body.solids.append(Solid("ball", {"x": s * fx, "y": y_fem, "z": fz, "r": fr}))
        troch = (s * (fx + 38 * kw), y_fem + 5, fz - 28 * k)
        body.tubes.append(_line((s * fx, y_fem, fz), troch, 14.0 * kw, 13.0 * kw, "limb"))
        body.tubes.append(
            _line(
                troch, (s * (fx + 22 * kw), y_fem + 10, fz - 420 * k), 13.0 * kw, 12.0 * kw, "limb"
            )
        )
        # pubic and ischial rami to the symphysis
        sym = (s * 9.0, y_fem - 42 * kw, fz - 22 * k)
        body.tubes.append(_line((s * (fx - 18), y_fem - 6, fz - 4), sym, 8.0, 7.0, "pelvis"))
        isch = (s * (fx - 28), y_fem + 22, fz - 58 * k)
        body.tubes.append(_line((s * (fx - 10), y_fem + 8, fz - 10), isch, 10.0, 9.0, "pelvis"))
        body.tubes.append(_line(isch, (sym[0], sym[1], sym[2] - 12), 7.0, 6.0, "pelvis"))
    body.extra["y_fem"] = y_fem


def _girdle(body: Body, rng: np.random.Generator) -> None:
    """Sternum, clavicles, scapulae, humeri (and forearms with the arms down)."""
    u = rng.uniform
    k, kw = body.k, body.kw
    t1 = body.level("T1")
    t3, t9 = body.level("T3"), body.level(f"T{min(9, body.n_rib_pairs)}")
    zs = 0.5 * (t3.zm + t9.zm)
    ys = float(torso_centre_y(body, zs) - 0.93 * body.core_b(zs))
    body.solids.append(
        Solid(
            "rbox",
            {
                "z0": t9.zm - 15,
                "z1": t3.z1 + 10,
                "x": 0.0,
                "y": ys,
                "hw": 14 * kw,
                "hd": 6.0,
                "corner": 5.0,
                "waist": 0.0,
            },
        )
    )
    zt = t1.z1
    a_top = float(body.core_a(zt - 20))
    yt = float(torso_centre_y(body, zt))
    for s in (-1.0, 1.0):
        glen = (s * 0.93 * a_top, yt + 0.1 * body.core_b(zt), zt - 25 * k)
        clav = bezier(
            np.array(
                [
                    [s * 14, yt - 0.8 * body.core_b(zt), zt - 5],
                    [s * 60, yt - 0.9 * body.core_b(zt), zt + 5],
                    [s * 0.8 * a_top, yt - 0.3 * body.core_b(zt), zt + 15],
                    [glen[0], glen[1] - 10, zt + 5],
                ]
            ),
            24,
        )
        body.tubes.append(Tube(clav, np.full(24, 6.0 * kw), "girdle"))
        ysc = yt + 0.85 * body.core_b(zt - 60)
        inf = (s * 70 * kw, ysc, zt - 150 * k)
        sup = (s * 55 * kw, ysc, zt - 10 * k)
        body.tubes.append(_line(sup, inf, 4.5, 4.0, "girdle"))
        body.tubes.append(_line(inf, glen, 5.0, 7.0, "girdle"))
        body.tubes.append(_line((s * 55 * kw, ysc + 5, zt - 40 * k), glen, 5.0, 6.0, "girdle"))
        if body.arms == "down":
            elbow = (s * (a_top + u(25.0, 45.0)), glen[1] + 10, glen[2] - 300 * k)
            wrist = (s * (a_top + u(10.0, 45.0)), glen[1] - 25, elbow[2] - 250 * k)
            body.tubes.append(_line(glen, elbow, 12.0 * kw, 9.0 * kw, "limb", n=12))
            for dx in (-8.0, 8.0):
                body.tubes.append(
                    _line(
                        (elbow[0] + dx, elbow[1], elbow[2]),
                        (wrist[0] + dx, wrist[1], wrist[2]),
                        6.0,
                        5.0,
                        "limb",
                    )
                )
            body.extra[f"arm{int(s)}"] = 1.0
            body.extra[f"arm{int(s)}_pts"] = np.array([glen, elbow, wrist])
        else:
            up = (s * (a_top - 10), glen[1], glen[2] + 300 * k)
            body.tubes.append(_line(glen, up, 12.0 * kw, 9.0 * kw, "limb", n=12))


def build(body: Body, rng: np.random.Generator) -> None:
    """Add every bone of ``body`` (vertebrae, ribs on thoracic levels only, pelvis, girdle)."""
    for lv in body.levels:
        _vertebra(body, lv, rng)
        if lv.ribs:
            _rib(body, lv, int(lv.name[1:]), rng)
    _pelvis(body, rng)
    _girdle(body, rng)
