"""End to end: seconds from the last instance received to the results stored in Orthanc.

Starts Orthanc (the PACS) and ``l3spot serve`` (embedded broker by default, or
``--redis URL`` with a separate ``l3spot worker``), sends the real abdomen CT
(``abdomen_ct_totalseg/ct.nii.gz`` written as a DICOM series) with dcmtk's ``storescu``,
waits for the job record to say ``done``, and prints per stage, from the job record's
timestamps:

* stable wait: last instance -> series complete (``node.series_stable_seconds`` + watcher tick);
* queue wait: queued -> analysis started (broker hop, worker pick-up);
* analysis: the pipeline (load, MIP, locate, composition, SEG/SR/SC);
* export: analysis done -> all objects stored in Orthanc (export queue hop + C-STORE);
* total minus the stable wait.

Needs trained locator weights (``locator.weights``); set ``L3SPOT__LOCATOR__WEIGHTS``.
Usage: ``python bench/bench_end_to_end.py [--redis redis://127.0.0.1:6379/13] [--runs 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.config import data_dir  # noqa: E402
from core.jobs import JobState  # noqa: E402
from tests.integration.test_integration_node import (  # noqa: E402 (after the path tweak)
    abdomen_case,
    run_node,
    start_orthanc,
    stop_process,
    wait_final,
)

STORESCU = "/usr/bin/storescu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=None, help="broker URL (default: embedded)")
    parser.add_argument("--runs", type=int, default=2, help="series sent one after another")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="l3spot-bench-e2e-"))
    (work / "orthanc").mkdir()
    (work / "node").mkdir()
    pacs = start_orthanc(work / "orthanc")
    try:
        with run_node(work / "node", args.redis, pacs) as node:
            rows = []
            for i in range(args.runs):
                case = abdomen_case(data_dir(), work / f"in{i}", f"l3spot-bench-e2e-{time.time()}")
                t0 = time.time()
                subprocess.run(
                    [
                        STORESCU,
                        "-aec",
                        "L3SPOT",
                        "127.0.0.1",
                        str(node.port),
                        "+sd",
                        str(case.folder),
                    ],
                    check=True,
                    capture_output=True,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
                t_last = time.time()
                rec = wait_final(node, case.series_uid, 600)
                if rec.state != JobState.DONE:
                    sys.exit(f"series ended {rec.state}: {rec.reason}")
                stages = {
                    "send (storescu)": t_last - t0,
                    "stable wait": rec.completed_at - t_last,
                    "queue wait": rec.analysis_started_at - rec.queued_at,
                    "analysis": rec.analysis_finished_at - rec.analysis_started_at,
                    "export": rec.export_finished_at - rec.analysis_finished_at,
                }
                stages["last instance -> in PACS, minus stable wait"] = (
                    rec.export_finished_at - t_last - stages["stable wait"]
                )
                rows.append((case.series_uid, rec.n_instances, stages))
            broker = args.redis or "embedded (filesystem transport)"
            print(f"broker: {broker}; stable time 2 s; series: abdomen CT, {rows[0][1]} slices")
            names = list(rows[0][2])
            print(
                f"{'stage':45} " + " ".join(f"{'run ' + str(i + 1):>8}" for i in range(len(rows)))
            )
            for name in names:
                print(f"{name:45} " + " ".join(f"{r[2][name]:8.2f}" for r in rows))
    finally:
        stop_process(pacs.proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
