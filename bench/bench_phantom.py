"""Phantom generation speed: a 512 x 512 x 400 volume, and the MIP-only training path.

Prints seconds per phantom and the ratio to allocating and filling the same float32 volume
with noise (a floor measured in the same run). Run: ``python bench/bench_phantom.py``.
"""

from __future__ import annotations

import time

import numpy as np

from worker.phantom import PhantomSpec, generate_phantom, generate_phantom_mip


def main() -> None:
    spec = PhantomSpec(
        fov="chest_abdomen_pelvis", rows=512, cols=512, pixel_spacing_mm=0.8, slice_thickness_mm=1.6
    )
    t0 = time.perf_counter()
    ph = generate_phantom(1, spec)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    floor = rng.standard_normal(ph.volume.hu.shape, dtype=np.float32)
    floor_s = time.perf_counter() - t0
    del floor
    print(
        f"full phantom {ph.volume.shape} (z, y, x) with labels: {full:.2f} s "
        f"({full / floor_s:.1f} x filling the same volume with noise, {floor_s:.2f} s)"
    )
    low = PhantomSpec(rows=200, cols=200, pixel_spacing_mm=2.0, slice_thickness_mm=4.0)
    n = 10
    t0 = time.perf_counter()
    for seed in range(n):
        generate_phantom_mip(seed, low, pixel_mm=2.0)
    print(
        f"MIP-only phantom, 200 x 200 px at 2 mm, 4 mm slices, random fov: "
        f"{(time.perf_counter() - t0) / n:.3f} s each (mean of {n})"
    )


if __name__ == "__main__":
    main()
