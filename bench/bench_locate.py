"""Benchmark of the L3 locator on a 512 x 512 x 500 series: time per scan by stage.

Stages: frontal MIP (3 mm), windows (strip + sliding windows), CNN (all windows, batched),
decision (correlation), then the second stage: fine MIP (1 mm) and refinement (fine windows
around the first answer, CNN, decision; ``worker/locator/fine.py``). CPU always, CUDA when
available. Uses the shipped weights when present (timing does not depend on the weights),
else randomly initialised CNN4s of the same geometries. Prints figures; asserts nothing.
Target (issue 3): < 1 s per scan on CPU for CNN4 at stride 4; the paper reports 2.36 s per
scan (VGG16, stride 6, Tesla K40).

Usage: python bench/bench_locate.py [--repeats 3] [--stride 4] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.config import LocatorConfig
from worker.locator.coarse import (
    REFINE_ALTERNATIVES,
    WindowSpec,
    decide_l3,
    load_locator,
    mip_to_strip,
    save_locator,
    sliding_windows,
)
from worker.locator.fine import FINE_STAGE, choose_run
from worker.locator.model import build_model
from worker.mip import frontal_mip
from worker.volume.load import CTVolume


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


def run(
    weights: Path,
    fine_weights: Path,
    vol: CTVolume,
    device: str,
    stride: int,
    repeats: int,
    alternatives: int = REFINE_ALTERNATIVES,
) -> dict[str, float]:
    """Median seconds per stage over ``repeats`` scans."""
    loc = load_locator(weights, device)
    fine = load_locator(fine_weights, device)
    spec = loc.spec
    names = ("mip", "windows", "cnn", "decision", "fine_mip", "refine")
    times: dict[str, list[float]] = {k: [] for k in names}
    n_windows = n_fine = 0
    for _ in range(repeats + 1):  # first run warms up
        t0 = time.perf_counter()
        mip = frontal_mip(vol, pixel_mm=spec.pixel_mm)
        t1 = time.perf_counter()
        win, tops = sliding_windows(mip_to_strip(mip.image, spec), spec, stride)
        t2 = time.perf_counter()
        rows, pres = loc.predict(win, 64)
        if loc.device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        d = decide_l3(tops, rows, spec.height_px, spec.a_px, pres, n_alternatives=alternatives)
        t4 = time.perf_counter()
        fine_mip = frontal_mip(vol, pixel_mm=fine.spec.pixel_mm)
        t5 = time.perf_counter()
        # worst case: the best run and all alternatives refined (in the pipeline only those
        # the presence head puts in the field of view)
        candidates = [d, *d.alternatives]
        for c in candidates:
            c.row = min(max(c.row, 0.0), mip.rows - 1.0)
        _, ref = choose_run(candidates, mip, fine_mip, fine, LocatorConfig().refine_stride_px)
        t6 = time.perf_counter()
        for k, v in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
            times[k].append(v)
        n_windows, n_fine = len(tops), ref.n_windows * len(candidates)
    out = {k: float(np.median(v[1:])) for k, v in times.items()}
    out["n_windows"], out["n_fine"] = n_windows, n_fine
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
    vol = synthetic_series()
    print(f"series {vol.shape} (z, y, x), {vol.hu.nbytes / 2**20:.0f} MiB, stride {args.stride}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        r = run(weights, fine_weights, vol, dev, args.stride, args.repeats)
        first = r["mip"] + r["windows"] + r["cnn"] + r["decision"]
        second = r["fine_mip"] + r["refine"]
        total = first + second
        print(
            f"{dev:>4}: first stage {first:.3f} s = MIP {r['mip']:.3f} + windows "
            f"{r['windows']:.4f} + CNN {r['cnn']:.3f} ({int(r['n_windows'])} windows) + "
            f"decision {r['decision']:.4f}; second stage {second:.3f} s = fine MIP "
            f"{r['fine_mip']:.3f} + refine {r['refine']:.3f} ({int(r['n_fine'])} windows); "
            f"total {total:.3f} s/scan; vs paper 2.36 s (VGG16, K40): x{2.36 / total:.1f}"
        )
    if not torch.cuda.is_available():
        print("cuda: not available on this machine")
    tmp.cleanup()


if __name__ == "__main__":
    main()
