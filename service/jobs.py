"""Job records as the node sees them: re-exports :mod:`core.jobs`, plus formatting.

The store itself lives in :mod:`core.jobs` because the workers write it too and
``worker`` never imports ``service``.
"""

from __future__ import annotations

import time

from core.jobs import (
    PENDING_STATES,
    ExportRecord,
    ExportState,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
)

__all__ = [
    "PENDING_STATES",
    "ExportRecord",
    "ExportState",
    "JobState",
    "JobNotFoundError",
    "JobRecord",
    "JobStore",
    "format_jobs",
]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def format_jobs(records: list[JobRecord]) -> str:
    """Plain-text table of job records for ``l3spot jobs`` (one line per series).

    Columns: updated time, state, instances, Series Instance UID, stage timings (s), and
    the reason (failed, ineligible) or note (e.g. "L3 not in field of view"), exports, and
    what retention purged ("spool purged <time>", "results purged <time>").
    """
    lines = [f"{'updated':19}  {'state':10}  {'n':>5}  {'series_instance_uid':64}  detail"]
    for r in records:
        timings = " ".join(f"{k.removesuffix('_s')}={v:.1f}s" for k, v in r.timings().items())
        exports = " ".join(
            f"[{e.destination} {e.state} x{e.attempts} {e.last_status or ''}]".replace(" ]", "]")
            for e in r.exports
        )
        purged = " ".join(
            f"{what} purged {_when(t)}"
            for what, t in (("spool", r.spool_purged_at), ("results", r.results_purged_at))
            if t
        )
        detail = " ".join(x for x in (r.reason or "", r.note or "", timings, exports, purged) if x)
        when = _when(r.updated_at)
        lines.append(f"{when:19}  {r.state:10}  {r.n_instances:>5}  {r.series_uid:64}  {detail}")
    return "\n".join(lines)
