"""Benchmark: the composition stage on the 336-slice real-geometry series, in-process.

The series is the one ``bench/bench_outputs.py`` writes, built here in memory: the real
abdomen CT (``abdomen_ct_totalseg/ct.nii.gz``, 3 mm isotropic) resampled to the geometry of a
clinical abdomen CT, 1 mm slices (336 slices), 0.75 mm pixels, padded with air to 512 x 512,
HU rounded to integers as a DICOM series stores them. The L3 slice is the shipped locator's
answer (or, without weights, the real case's slice z 72 mapped to 1 mm).

Per repeat, in the same run:

1. reference: ``scipy.ndimage.distance_transform_edt`` of the L3 slice's body (HU > -500),
   a simple operation on the same 512 x 512 grid that scales with the machine;
2. ``measure_composition`` on the L3 slice with ``CompositionConfig()`` defaults (what
   ``timing_s.composition`` of ``result.json`` measures).

Prints the medians in seconds and the composition stage as a multiple of the reference;
asserts nothing. Needs the real data (``$L3SPOT_DATA`` or ``../shared/data``).

Usage: python bench/bench_composition.py [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from real_geometry import PIXEL_MM, real_geometry_volume  # noqa: E402

from core.config import CompositionConfig, load_config  # noqa: E402
from worker.composition.measure import measure_composition  # noqa: E402
from worker.volume.load import CTVolume  # noqa: E402


def real_geometry_series() -> CTVolume:
    """The clinical-size real case in memory (``bench/real_geometry.py``)."""
    return real_geometry_volume()


def l3_index(volume: CTVolume) -> int:
    """The shipped locator's L3 slice, or the real case's z 72 (3 mm) mapped to 1 mm."""
    try:
        from worker.locator.locate import locate_l3

        cfg = load_config()
        loc = locate_l3(volume, cfg.locator, device="cpu")
        if loc.in_field_of_view and loc.slice_index is not None:
            return int(loc.slice_index)
    except Exception as exc:  # noqa: BLE001 (a benchmark: fall back, say why)
        print(f"locator unavailable ({exc}); using z 72 of the 3 mm case")
    return 72 * 3 + 1


def _timed(fn):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one composition")
    args = parser.parse_args()
    volume = real_geometry_series()
    index = l3_index(volume)
    cfg = CompositionConfig()
    print(
        f"series: {volume.hu.shape[0]} slices, {volume.hu.shape[1]} x {volume.hu.shape[2]} px,"
        f" {PIXEL_MM} mm pixels; L3 slice index {index}"
    )
    res = measure_composition(volume, index, cfg, device="cpu")  # warm-up (imports)
    print(
        "SMA {:.2f} cm2, VAT {:.2f} cm2, SAT {:.2f} cm2, IMAT {:.2f} cm2; flags {}".format(
            *(res.measures[k].area_cm2 for k in ("sma", "vat", "sat", "imat")), res.qa_flags
        )
    )
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(measure_composition, volume, index, cfg, device="cpu")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    body = volume.hu[index] > -500
    ref, comp = [], []
    for _ in range(args.repeats):
        ref.append(_timed(lambda: ndimage.distance_transform_edt(body))[0])
        comp.append(_timed(lambda: measure_composition(volume, index, cfg, device="cpu"))[0])
    r, c = statistics.median(ref), statistics.median(comp)
    print(f"median of {args.repeats} repeats, seconds (x reference)")
    print(f"{'reference: distance_transform_edt of the body':48} {r:8.4f}  {1.0:7.1f}x")
    print(f"{'composition stage (measure_composition)':48} {c:8.4f}  {c / r:7.1f}x")


if __name__ == "__main__":
    main()
