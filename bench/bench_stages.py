"""Benchmark: the analysis stages in-process, this checkout against another one (before/after).

Runs ``worker.pipeline.analyze_series`` on the 336-slice real-geometry series (the real
abdomen CT resampled to 1 mm slices and 0.75 mm pixels, 512 x 512; built and cached by
``bench/bench_outputs.py``'s ``make_series``) in a fresh interpreter per checkout (``--root``
for the other one, e.g. a worktree of the commit before the restructure), once to warm up and
``--repeats`` times measured, and prints the median of each stage of ``result.json``'s
``timing_s`` (load, MIP, locate, composition, outputs) for both, with the ratio. The same
machine, the same run, the same series: only the code differs. Asserts nothing.

Usage: python bench/bench_stages.py --root /path/to/old/checkout [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside the checkout under test: only the pipeline's public entry and the config loader,
# which both layouts have (worker.config before the restructure, core.config after).
CHILD = r"""
import json, statistics, sys, tempfile
from pathlib import Path
try:  # before the restructure (checked first: core/ may be importable from elsewhere)
    from worker.config import load_config
except ImportError:
    from core.config import load_config
from worker.pipeline import analyze_series
series, repeats = Path(sys.argv[1]), int(sys.argv[2])
config = load_config()
config.analysis.device = "cpu"
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for i in range(repeats + 1):
        result = analyze_series(series, Path(tmp) / f"o{i}", config)
        if i:
            rows.append(dict(result.timing_s))
print(json.dumps({k: statistics.median(r[k] for r in rows) for k in rows[0]}))
"""


def stage_times(root: Path, series: Path, repeats: int) -> dict[str, float]:
    """Median stage times (s) of ``analyze_series`` run from the checkout at ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(series), str(repeats)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"{root}: the pipeline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the other checkout (before)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "l3spot-bench-outputs"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from bench_outputs import make_series

    series = make_series(args.cache / "series")
    before = stage_times(args.root.resolve(), series, args.repeats)
    after = stage_times(REPO, series, args.repeats)
    print(f"series: {series} (336 x 512 x 512, 0.75 mm pixels, 1 mm slices)")
    print(f"before: {args.root}   after: {REPO}   medians of {args.repeats} runs, seconds")
    print(f"{'stage':14} {'before':>8} {'after':>8} {'after/before':>13}")
    for key in dict.fromkeys([*before, *after]):
        b, a = before.get(key), after.get(key)
        ratio = f"{a / b:13.2f}" if a is not None and b else f"{'':>13}"
        fb = f"{b:8.3f}" if b is not None else f"{'-':>8}"
        fa = f"{a:8.3f}" if a is not None else f"{'-':>8}"
        print(f"{key:14} {fb} {fa} {ratio}")


if __name__ == "__main__":
    main()
