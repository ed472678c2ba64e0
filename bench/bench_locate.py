"""Benchmark of the L3 locator: time per scan by stage, and MIP projections per analysis.

Two series: a synthetic 512 x 512 x 500 volume (1 mm slices), and the 336-slice
real-geometry series (the real abdomen CT ``abdomen_ct_totalseg/ct.nii.gz``, 112 slices of
3 mm, interpolated to 1 mm slices and 0.75 mm pixels: 336 x 404 x 488) when the data folder
(``$L3SPOT_DATA``) is present.

Stages: projection (max over the anterior-posterior axis, once per analysis), the 3 mm MIP
and the 1 mm MIP (resampled from that projection; :class:`worker.mip.FrontalMips`), windows
(strip + sliding windows), CNN (all windows, batched), decision (correlation), refinement
(fine windows around the first answer and its alternatives, CNN, decision;
``worker/locator/fine.py``); then the whole ``locate_l3`` as the pipeline calls it (MIPs
given) and without MIPs (built inside); the level verification alone
(``worker/locator/vertebrae.py``: box, 3-D segmentation, count) and ``locate_l3`` without
it. CPU always, CUDA when available. Uses the shipped
weights when present (timing does not depend on the weights), else randomly initialised
CNN4s of the same geometries. Prints figures; asserts nothing.
Target (issue 3): < 1 s per scan on CPU for CNN4 at stride 4; the paper reports 2.36 s per
scan (VGG16, stride 6, Tesla K40). Issue 13: one projection per analysis. Issue 15: first
stage + refinement + verification <= 1 s per 512 x 512 x 500 scan on 2 CPU cores.

Usage: python bench/bench_locate.py [--repeats 3] [--stride 4] [--threads N] [--synthetic-only]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from core.config import LocatorConfig, data_dir
from worker.locator.decision import decide_l3
from worker.locator.fine import FINE_STAGE, choose_run
from worker.locator.locate import REFINE_ALTERNATIVES, locate_l3
from worker.locator.model import build_model
from worker.locator.vertebrae import SpineFCN, load_spine_model, verify_in_volume
from worker.locator.weights import load_locator, save_locator
from worker.locator.windows import WindowSpec, mip_to_strip, sliding_windows
from worker.mip import FrontalMips
from worker.volume.load import CTVolume, load_series


def synthetic_series(n: int = 500, size: int = 512, seed: int = 0) -> CTVolume:
    """(500, 512, 512) HU volume: body ellipse, a bright spine, noise; 1 mm slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - 256) / 170.0) ** 2 + ((xx - 256) / 220.0) ** 2 < 1
    hu = np.full((n, size, size), -1000.0, np.float32)
    hu[:, body] = 40.0
    hu[:, 330:380, 236:276] = 300.0
    hu += rng.normal(0, 20, size=(1, size, size)).astype(np.float32)
    z = np.arange(n, dtype=np.float64) * 1.0
    return CTVolume(hu=hu, z_mm=z, pixel_spacing_mm=(0.8, 0.8), series_instance_uid="bench")


def real_geometry_series(root: Path) -> CTVolume | None:
    """The real abdomen CT at 1 mm slices and 0.75 mm pixels: (336, 404, 488); None if absent."""
    path = root / "abdomen_ct_totalseg" / "ct.nii.gz"
    if not path.is_file():
        return None
    vol = load_series(path)
    hu = ndimage.zoom(vol.hu, (3.0, 4.0, 4.0), order=1).astype(np.float32)
    z = np.linspace(float(vol.z_mm[0]), float(vol.z_mm[-1]), hu.shape[0])
    return CTVolume(hu=hu, z_mm=z, pixel_spacing_mm=(0.75, 0.75), series_instance_uid="bench336")


def run(
    weights: Path,
    fine_weights: Path,
    verify: Path | None,
    vol: CTVolume,
    device: str,
    stride: int,
    repeats: int,
    alternatives: int = REFINE_ALTERNATIVES,
) -> dict[str, float]:
    """Median seconds per stage over ``repeats`` scans (after one warm-up)."""
    loc = load_locator(weights, device)
    fine = load_locator(fine_weights, device)
    spec = loc.spec
    cfg = LocatorConfig(
        weights=weights, refine_weights=fine_weights, stride_px=stride, verify_weights=verify
    )
    bare = cfg.model_copy(update={"verify_weights": None})
    net = None if verify is None else load_spine_model(verify)
    spacing = (float(vol.pixel_spacing_mm[0]), float(vol.pixel_spacing_mm[1]))
    names = ("projection", "mip", "fine_mip", "windows", "cnn", "decision", "refine",
             "locate_given_mips", "locate_building_mips", "verify", "locate_no_verify")  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in names}
    n_windows = n_fine = projections = 0
    parts: dict[str, list[float]] = {}  # the verification's own steps
    for _ in range(repeats + 1):  # first run warms up
        t0 = time.perf_counter()
        mips = FrontalMips(vol)
        _ = mips.projection
        t1 = time.perf_counter()
        mip = mips.at(spec.pixel_mm)
        t2 = time.perf_counter()
        fine_mip = mips.at(fine.spec.pixel_mm)
        t3 = time.perf_counter()
        win, tops = sliding_windows(mip_to_strip(mip.image, spec), spec, stride)
        t4 = time.perf_counter()
        rows, pres = loc.predict(win, 64)
        if loc.device.type == "cuda":
            torch.cuda.synchronize()
        t5 = time.perf_counter()
        d = decide_l3(tops, rows, spec.height_px, spec.a_px, pres, n_alternatives=alternatives)
        t6 = time.perf_counter()
        # worst case: the best run and all alternatives refined (in the pipeline only those
        # the presence head puts in the field of view)
        candidates = [d, *d.alternatives]
        for c in candidates:
            c.row = min(max(c.row, 0.0), mip.rows - 1.0)
        _, ref = choose_run(candidates, mip, fine_mip, fine, cfg.refine_stride_px)
        t7 = time.perf_counter()
        # as the pipeline calls it: MIPs built beforehand (above), so none built here
        locate_l3(vol, cfg, mips, device=device)
        t8 = time.perf_counter()
        fresh = FrontalMips(vol)
        res = locate_l3(vol, cfg, fresh, device=device)  # MIPs built inside, one projection
        t9 = time.perf_counter()
        # the level verification alone (box, 3-D segmentation, count) around the answer
        z = res.z_mm if res.z_mm is not None else float(np.median(vol.z_mm))
        if net is not None:
            v = verify_in_volume(net, vol.hu, vol.z_mm, spacing, float(z))
            for part, sec in v.timings_s.items():
                parts.setdefault(part, []).append(sec)
        t10 = time.perf_counter()
        locate_l3(vol, bare, mips, device=device)  # both stages, no verification
        t11 = time.perf_counter()
        stamps = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11)
        for k, a, b in zip(names, stamps[:-1], stamps[1:], strict=True):
            times[k].append(b - a)
        n_windows, n_fine = len(tops), ref.n_windows * len(candidates)
        projections = mips.projections + fresh.projections
    out = {k: float(np.median(v[1:])) for k, v in times.items()}
    out.update({f"verify_{k}": float(np.median(v[1:] or v)) for k, v in parts.items()})
    out["n_windows"], out["n_fine"] = n_windows, n_fine
    out["projections_per_analysis"] = projections / 2
    return out


def _random_weights(folder: Path, name: str, spec: WindowSpec, fine: bool) -> Path:
    path = folder / name
    model = build_model("cnn4", spec.height_px, spec.width_px, presence_head=not fine)
    save_locator(path, model, "cnn4", spec, {"stage": FINE_STAGE} if fine else {})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stride", type=int, default=LocatorConfig().stride_px)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--synthetic-only", action="store_true", help="skip the real-geometry series")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LocatorConfig()
    tmp = tempfile.TemporaryDirectory()
    weights, fine_weights = cfg.weights, cfg.refine_weights
    if not weights.is_file():
        weights = _random_weights(Path(tmp.name), "coarse.pt", WindowSpec(), fine=False)
        print("shipped weights missing: timing a random CNN4 of the shipped geometry")
    if fine_weights is None or not fine_weights.is_file():
        fine_spec = WindowSpec(pixel_mm=1.0, height_mm=128.0, width_mm=128.0, a_mm=18.0)
        fine_weights = _random_weights(Path(tmp.name), "fine.pt", fine_spec, fine=True)
        print("no refinement weights configured: timing a random fine CNN4 (1 mm, 128 x 128 mm)")
    verify = cfg.verify_weights if cfg.verify_weights and cfg.verify_weights.is_file() else None
    if verify is None:
        print("level-verification weights missing: timing a random network of the same shape")
        verify = Path(tmp.name) / "spine.pt"
        torch.save({"state_dict": SpineFCN().state_dict(), "base": 8}, verify)
    series = [("synthetic", synthetic_series())]
    real = None if args.synthetic_only else real_geometry_series(data_dir())
    if real is not None:
        series.append(("real-geometry", real))
    elif not args.synthetic_only:
        print(f"real-geometry series skipped: no abdomen_ct_totalseg under {data_dir()}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, stride {args.stride}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, vol in series:
        print(f"{name} series {vol.shape} (z, y, x), {vol.hu.nbytes / 2**20:.0f} MiB")
        for dev in devices:
            r = run(weights, fine_weights, verify, vol, dev, args.stride, args.repeats)
            mips = r["projection"] + r["mip"] + r["fine_mip"]
            first = r["windows"] + r["cnn"] + r["decision"]
            total = mips + first + r["refine"]
            print(
                f"{dev:>6}: MIPs {mips:.3f} s = projection {r['projection']:.3f} + 3 mm "
                f"{r['mip']:.4f} + 1 mm {r['fine_mip']:.4f} "
                f"({r['projections_per_analysis']:.0f} projection per analysis); first stage "
                f"{first:.3f} s = windows {r['windows']:.4f} + CNN {r['cnn']:.3f} "
                f"({int(r['n_windows'])} windows) + decision {r['decision']:.4f}; refinement "
                f"{r['refine']:.3f} s ({int(r['n_fine'])} windows, worst case); total "
                f"{total:.3f} s/scan (vs paper 2.36 s, VGG16, K40: x{2.36 / total:.1f})\n"
                f"        locate_l3 with the pipeline's MIPs {r['locate_given_mips']:.3f} s, "
                f"building its own {r['locate_building_mips']:.3f} s\n"
                f"        level verification {r['verify']:.3f} s (box "
                f"{r.get('verify_box', float('nan')):.3f} + 3-D segmentation "
                f"{r.get('verify_segment', float('nan')):.3f} + count "
                f"{r.get('verify_count', float('nan')):.3f}"
                + (
                    f" + second box {r['verify_second_box']:.3f}"
                    if "verify_second_box" in r
                    else ""
                )
                + "); locate_l3 with it "
                f"{r['locate_given_mips']:.3f} s = "
                f"x{r['locate_given_mips'] / r['locate_no_verify']:.2f} of locate_l3 without "
                f"it ({r['locate_no_verify']:.3f} s, same run); issue 15 target: <= 1 s\n"
            )
    if not torch.cuda.is_available():
        print("cuda: not available on this machine")
    tmp.cleanup()


if __name__ == "__main__":
    main()
