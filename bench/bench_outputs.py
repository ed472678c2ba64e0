"""Benchmark: the outputs stage (SEG, SR, SC, overview.png) on a real-geometry series.

The series is the real abdomen CT (``abdomen_ct_totalseg/ct.nii.gz``, 3 mm isotropic)
resampled to the geometry of a clinical abdomen CT: 1 mm slices (336 slices), 0.75 mm pixels,
padded with air to 512 x 512, written once with :func:`worker.volume.write.write_ct_series`
into a cache folder and reused. The stages before the outputs (load, MIP, locate,
composition) run once; then, per repeat, in the same run:

1. reference: ``pydicom.dcmread`` and ``save_as`` of the 25 source images around L3 (plain
   DICOM reading and writing, of about the stage's size: the yardstick the ratio uses);
2. ``worker.pipeline.write_outputs`` into a fresh folder (what ``timing_s.dicom_out`` of
   ``result.json`` measures);
3. a breakdown per object with the public builders (read of the L3 image, SEG, SR, the
   Secondary Capture picture and object, overview.png), each written to disk.

The first call of ``write_outputs`` in the process (imports, fonts, highdicom's code tables:
what ``l3spot analyze`` pays) is printed apart. Prints medians of wall time and of the
main thread's CPU time (steadier when other work shares the cores) in seconds and as multiples of
the reference; asserts nothing. Needs the shipped locator weights (``models/``) and the real
data (``$L3SPOT_DATA`` or ``../shared/data``).

Usage: python bench/bench_outputs.py [--repeats 5] [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from PIL import Image
from real_geometry import N_SLICES, PIXEL_MM, SIZE, real_geometry_volume

from core.config import load_config
from worker import pipeline
from worker.composition.measure import measure_composition
from worker.locator.locate import locate_l3
from worker.mip import FrontalMips
from worker.outputs.render import render_overview, render_summary
from worker.outputs.sc import build_sc
from worker.outputs.seg import build_seg
from worker.outputs.sr import build_sr
from worker.pipeline import load_input, write_outputs
from worker.volume.write import write_ct_series

UID_SEED = "l3spot-bench-outputs-real-geometry"
#: The reference reads and writes this many source images around L3 (about the stage's size).
N_REF = 25
REFERENCE = f"reference: dcmread + save_as of {N_REF} CT images"


def make_series(folder: Path) -> Path:
    """Write (or reuse) the 336-slice real-geometry series; returns its folder."""
    marker = folder / f".complete_{N_SLICES}x{SIZE}"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.dcm"):
        f.unlink()
    res = real_geometry_volume()
    write_ct_series(res, folder, uid_seed=UID_SEED, series_description="BENCH REAL GEOMETRY")
    marker.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "l3spot-bench-outputs"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the last outputs here")
    args = parser.parse_args()
    config = load_config()
    series = make_series(args.cache / "series")
    work = Path(tempfile.mkdtemp(prefix="l3spot-bench-outputs-"))
    try:
        volume, _ = load_input(series, work / "unused", config)
        mips = FrontalMips(volume)
        location = locate_l3(volume, config.locator, mips, device="cpu")
        mip = mips.at(mips.pixel_sizes[0])
        composition = None
        if location.in_field_of_view and location.slice_index is not None:
            index = int(location.slice_index)
            composition = measure_composition(volume, index, config.composition, device="cpu")
        else:
            index = len(volume.source_files) // 2
        ref_file = volume.source_files[index]
        ref_files = volume.source_files[max(0, index - N_REF // 2) :][:N_REF]
        print(
            f"series: {volume.hu.shape[0]} slices, {volume.hu.shape[1]} x {volume.hu.shape[2]} px,"
            f" {PIXEL_MM} mm pixels; L3 in field of view: {location.in_field_of_view},"
            f" reference image index {index}"
        )
        in_fov = composition is not None
        qa: list[str] = list(composition.qa_flags) if composition is not None else []
        # warm-up: imports, fonts, first-touch memory
        (work / "warmup").mkdir()
        t0, c0 = time.perf_counter(), time.thread_time()
        write_outputs(volume, mip, location, composition, qa, work / "warmup")
        first = (time.perf_counter() - t0, time.thread_time() - c0)

        rows: dict[str, list[tuple[float, float]]] = {}

        @contextmanager
        def timed(name: str) -> Iterator[None]:
            t0, c0 = time.perf_counter(), time.thread_time()
            yield
            t1, c1 = time.perf_counter(), time.thread_time()
            rows.setdefault(name, []).append((t1 - t0, c1 - c0))

        # what this version of write_outputs does for the reading and the PNG (main: a full
        # dcmread and Pillow's default deflate)
        read = getattr(pipeline, "read_source_header", pydicom.dcmread)
        png_options = getattr(pipeline, "OVERVIEW_PNG_OPTIONS", {"optimize": False})
        hu_slice = volume.hu[index] if in_fov else None
        for i in range(args.repeats):
            with timed(REFERENCE):
                for f in ref_files:
                    pydicom.dcmread(f).save_as(io.BytesIO(), enforce_file_format=True)
            out = work / f"run{i}"
            out.mkdir()
            with timed("outputs stage (write_outputs)"):
                write_outputs(volume, mip, location, composition, qa, out)
            # breakdown with the public builders, in write_outputs' order
            bd = work / f"bd{i}"
            bd.mkdir()
            with timed("  read L3 source image"):
                ref = read(ref_file)
            seg = None
            if composition is not None:
                with timed("  SEG build + write"):
                    seg = build_seg(ref, composition.labels, method=composition.method)
                    seg.save_as(bd / "seg.dcm", enforce_file_format=True)
            with timed("  SR build + write"):
                sr = build_sr(ref, location, composition, seg)
                sr.save_as(bd / "sr.dcm", enforce_file_format=True)
            with timed("  SC picture (render_summary)"):
                summary = render_summary(
                    hu_slice,
                    volume.pixel_spacing_mm,
                    mip,
                    location,
                    composition,
                    qa,
                    volume.series_description,
                )
            with timed("  SC object build + write"):
                sc = build_sc(ref, summary)
                sc.save_as(bd / "sc.dcm", enforce_file_format=True)
            with timed("  overview picture (render_overview)"):
                overview = render_overview(summary, mip, location)
            with timed("  overview.png encode + write"):
                Image.fromarray(overview).save(bd / "overview.png", format="PNG", **png_options)
        if args.out is not None:
            if args.out.exists():
                shutil.rmtree(args.out)
            shutil.copytree(work / f"run{args.repeats - 1}", args.out)
        wall = {k: statistics.median(t for t, _ in v) for k, v in rows.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
        print(
            f"outputs stage, first call in this process: {first[0]:.4f} s wall,"
            f" {first[1]:.4f} s CPU"
        )
        print(f"median of {args.repeats} repeats: wall s (x reference), CPU s (x reference)")
        for name in wall:
            print(
                f"{name:48} {wall[name]:8.4f} ({wall[name] / wall[REFERENCE]:5.2f}x)"
                f" {cpu[name]:8.4f} ({cpu[name] / max(cpu[REFERENCE], 1e-9):5.2f}x)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
