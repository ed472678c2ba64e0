"""Benchmark: the HU histogram check on a clinical-size volume, against a full-volume minimum.

``worker.volume.hu.check_hu_histogram`` runs on every loaded series (issue 14: values that
are not CT Hounsfield units are refused). It reads a 1/64 subsample; this prints its time on
a 336 x 512 x 512 volume (soft tissue, fat, air, -3024 padding outside the scan circle) and
the ratio to ``numpy.min`` over the whole volume measured in the same run (one pass over the
data: the yardstick). Best of 7. Asserts nothing.

Usage: python bench/bench_hu_check.py
"""

from __future__ import annotations

import time

import numpy as np

from worker.volume.hu import check_hu_histogram


def best_of(fn, n: int = 7) -> float:  # type: ignore[no-untyped-def]
    """Shortest wall time (s) of ``n`` calls."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    hu = np.full((336, 512, 512), -1000.0, np.float32)
    hu[:, 100:400, 80:430] = rng.normal(-40, 80, size=(300, 350)).astype(np.float32)
    yy, xx = np.mgrid[:512, :512]
    hu[:, (yy - 255.5) ** 2 + (xx - 255.5) ** 2 > 256.0**2] = -3024.0
    check = best_of(lambda: check_hu_histogram("bench", hu))
    reference = best_of(lambda: float(hu.min()))
    print("volume 336 x 512 x 512 float32, best of 7")
    print(f"reference: numpy.min over the volume  {1000 * reference:7.1f} ms")
    ratio = check / reference
    print(f"check_hu_histogram                    {1000 * check:7.1f} ms  ({ratio:.2f} x)")


if __name__ == "__main__":
    main()
