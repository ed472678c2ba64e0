"""Job store speed: one series' life (the calls a node and a worker make), per backend.

    python bench/bench_jobs.py [--n 300] [--url postgresql+psycopg://postgres@127.0.0.1/db]

Prints the mean milliseconds per series life (received, queued, analysing, heartbeat,
exporting, one export attempt, done, one read) and per ``JobStore(...)`` construction.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

from core.jobs import JobStore


def _store(spool: Path, url: str | None) -> JobStore:
    if url is None or "database_url" not in inspect.signature(JobStore).parameters:
        return JobStore(spool)
    return JobStore(spool, database_url=url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp)
        t0 = time.perf_counter()
        for _ in range(20):
            store = _store(spool, args.url)
        t_open = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        for i in range(args.n):
            uid = f"1.2.3.{time.time_ns()}.{i}"
            store.mark_received(uid, "1.2", spool / uid)
            token = store.mark_queued(uid, 40)
            store.start_analysis(uid, token, worker="bench/1")
            store.heartbeat(uid, token)
            store.finish_analysis(uid, None, exporting=True, token=token)
            store.start_export(uid, ["PACS@h:104"])
            store.record_export_attempt(uid, "PACS@h:104", True, "0x0000", None, final=False)
            store.finish_export(uid)
            store.get(uid)
        t_life = (time.perf_counter() - t0) / args.n
    print(f"open {t_open * 1e3:.2f} ms  series life {t_life * 1e3:.2f} ms  (n={args.n})")


if __name__ == "__main__":
    main()
