"""Benchmark: load a 512 x 512 x 500 DICOM CT series and project its frontal MIP, against the
I/O floor (reading the same files' bytes and nothing else).

The series is written once with :func:`worker.volume.write.write_ct_series` (uncompressed
Explicit VR Little Endian, 0.8 mm pixels, 1 mm slices, a body ellipse with noise and a bright
spine) into a cache folder and reused. Each repeat measures, in the same run:

1. floor: reading every file's bytes (sequential, and in a thread pool; the faster counts);
2. ``load_series`` (validation, sorting, HU float32 volume);
3. ``frontal_mip`` at ``--pixel-mm``.

``--cold`` evicts the files from the page cache (``posix_fadvise(DONTNEED)``, no root needed)
before the floor and before the load, so both read from the disk; the default measures with
the files in the page cache, where the floor is memory bandwidth and the loader's CPU work
shows most. A warm-up load runs first (this VM backs fresh guest memory slowly on first touch).
Prints figures; asserts nothing.

Usage: python bench/bench_load_mip.py [--slices 500] [--repeats 3] [--cold] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from worker.mip import frontal_mip
from worker.volume.load import CTVolume, PatientInfo, load_series
from worker.volume.write import write_ct_series


def make_series(folder: Path, n: int, size: int) -> list[Path]:
    """Write (or reuse) the benchmark series; returns its files."""
    marker = folder / f".complete_{n}x{size}"
    if marker.exists():
        return sorted(folder.glob("*.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.dcm"):
        f.unlink()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    body = ((yy - c) / (0.33 * size)) ** 2 + ((xx - c) / (0.43 * size)) ** 2 < 1
    base = np.full((size, size), -1000.0, np.float32)
    base[body] = 40.0
    base[int(0.64 * size) : int(0.74 * size), int(0.46 * size) : int(0.54 * size)] = 700.0
    hu = np.empty((n, size, size), np.float32)
    for k in range(n):
        hu[k] = base + rng.normal(0.0, 15.0, size=(size, size)).astype(np.float32)
    vol = CTVolume(
        hu=hu,
        z_mm=-250.0 + np.arange(n, dtype=np.float64),
        pixel_spacing_mm=(0.8, 0.8),
        image_position_first=(-204.4, -204.4, -250.0),
        patient=PatientInfo(patient_id="BENCH", sex="F", size_m=1.65, weight_kg=60.0),
        slice_thickness_mm=1.0,
    )
    t = time.perf_counter()
    write_ct_series(vol, folder, uid_seed="bench-load-mip", series_description="bench")
    print(f"wrote {n} slices of {size} x {size} in {time.perf_counter() - t:.2f} s to {folder}")
    marker.touch()
    return sorted(folder.glob("*.dcm"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (best effort)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path], workers: int) -> int:
    if workers <= 1:
        return sum(len(f.read_bytes()) for f in files)
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(lambda f: len(f.read_bytes()), files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pixel-mm", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=None, help="loader threads (default: auto)")
    ap.add_argument("--cold", action="store_true", help="evict the files before each read")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "l3spot_bench_series",
        help="folder for the generated series (reused between runs)",
    )
    args = ap.parse_args()

    folder = args.cache / f"ct_{args.size}x{args.size}x{args.slices}"
    files = make_series(folder, args.slices, args.size)
    nbytes = sum(f.stat().st_size for f in files)
    threads = args.workers or min(16, 2 * (os.cpu_count() or 2))
    print(
        f"series: {len(files)} files, {nbytes / 1e6:.0f} MB, {os.cpu_count()} CPUs, "
        f"loader threads {threads}, page cache {'evicted' if args.cold else 'warm'}"
    )

    load_series(folder, workers=args.workers)  # warm-up (imports, memory), not counted
    floor_seq, floor_par, t_load, t_mip = [], [], [], []
    for _ in range(args.repeats):
        if args.cold:
            evict(files)
        t = time.perf_counter()
        read_all(files, 1)
        floor_seq.append(time.perf_counter() - t)
        if args.cold:
            evict(files)
        t = time.perf_counter()
        read_all(files, threads)
        floor_par.append(time.perf_counter() - t)
        if args.cold:
            evict(files)
        t = time.perf_counter()
        vol = load_series(folder, workers=args.workers)
        t_load.append(time.perf_counter() - t)
        t = time.perf_counter()
        mip = frontal_mip(vol, pixel_mm=args.pixel_mm)
        t_mip.append(time.perf_counter() - t)
        del vol

    med = statistics.median
    floor = min(med(floor_seq), med(floor_par))
    print(f"MIP {mip.image.shape[1]} x {mip.image.shape[0]} px at {args.pixel_mm:g} mm")
    print(f"median of {args.repeats}:")
    print(
        f"  I/O floor  sequential {med(floor_seq):.3f} s ({nbytes / 1e6 / med(floor_seq):.0f} "
        f"MB/s), {threads} threads {med(floor_par):.3f} s "
        f"({nbytes / 1e6 / med(floor_par):.0f} MB/s)"
    )
    print(f"  load_series {med(t_load):.3f} s = {med(t_load) / floor:.1f} x floor")
    print(f"  frontal_mip {med(t_mip):.3f} s")
    total = med(t_load) + med(t_mip)
    print(f"  load + MIP  {total:.3f} s = {total / floor:.1f} x floor")


if __name__ == "__main__":
    main()
