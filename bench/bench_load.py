"""Load: concurrent associations -> one node -> two workers -> Orthanc; nothing lost, once each.

Default run (issue 7, "Load"): 10 concurrent associations send 20 phantom series of 500
instances each (10,000 instances, 64 x 64 CT: small images, so the node's per-instance work
dominates) to one ``l3spot serve`` with a private Redis broker and two ``l3spot worker``
processes; the PACS is Orthanc. Every association is a separate process with a pynetdicom
SCU that times each C-STORE round trip. The run then checks that every instance was
acknowledged and is in the spool, that every series was analysed exactly once (one attempt
in its job record), and that Orthanc holds exactly the result objects of each series, and
prints:

* instances/s (acknowledged instances / wall time of the sending);
* p50 and p95 C-STORE latency (ms), all associations together;
* peak resident memory of the node process (VmHWM, MiB; the workers are separate processes);
* seconds until every series' job record was final.

Usage: ``python bench/bench_load.py [--associations 10] [--series 20] [--instances 500]
[--size 64] [--no-fsync]``. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.node import run_load  # noqa: E402 (after the path tweak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--instances", type=int, default=500, help="per series")
    parser.add_argument("--size", type=int, default=64, help="rows = columns")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-fsync", action="store_true", help="node.fsync: false")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="l3spot-bench-load-"))
    try:
        report = run_load(
            work,
            args.associations,
            args.series,
            args.instances,
            size=args.size,
            n_workers=args.workers,
            timeout_s=1800,
            fsync=not args.no_fsync,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"load: {args.associations} associations x {args.series} series x {args.instances} "
        f"instances ({args.size}x{args.size}), {args.workers} workers, fsync "
        f"{'off' if args.no_fsync else 'on'}"
    )
    print(report.summary())
    n_series = len(report.records)
    checks = {
        "every instance acknowledged": report.acknowledged == report.instances,
        "every instance in the spool": report.stored == report.expected,
        "no association error": not report.errors,
        "every series analysed exactly once": all(r.attempts == 1 for r in report.records.values()),
        "every series done or failed with a reason": all(
            r.state == "done" or (r.state == "failed" and r.reason) for r in report.records.values()
        ),
        "PACS holds exactly the results of each series": all(report.pacs_ok.values()),
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    done = sum(r.state == "done" for r in report.records.values())
    print(f"  series done: {done}/{n_series}; errors: {report.errors[:3]}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
