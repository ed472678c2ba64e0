"""Series completeness: a per-series inactivity timer, then eligibility and enqueueing.

A series is complete when no instance of it arrived for ``node.series_stable_seconds``
(like Orthanc's ``StableAge``). The timer belongs to the series, not to the association:
scanners send one series over several associations, or one instance per association
(pynetdicom#369, #855). An instance arriving after the series was queued starts the timer
again, and the series is analysed again when it is stable (tasks are idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.eligibility import check_series
from service.spool import Spool
from worker import jobstore
from worker.config import NodeConfig
from worker.jobstore import JobStore
from worker.logs import log_event

log = logging.getLogger(__name__)

#: ``enqueue(series_dir, series_uid, token)`` sends the analysis task.
Enqueue = Callable[[Path, str, str], None]


@dataclass
class _Pending:
    study_uid: str
    series_dir: Path
    last_seen: float
    count: int = 0


class SeriesWatcher:
    """Tracks series being received and hands complete, eligible ones to ``enqueue``.

    Parameters
    ----------
    node : ``node`` configuration (stable time, check interval, eligibility rules).
    jobs : the job records.
    enqueue : called once per complete eligible series (from the watcher thread).
    clock : monotonic clock in seconds (replaceable in tests).
    """

    def __init__(
        self,
        node: NodeConfig,
        jobs: JobStore,
        enqueue: Enqueue,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.jobs = jobs
        self.enqueue = enqueue
        self.clock = clock
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- called from the SCP's association threads ------------------------------------

    def touch(self, study_uid: str, series_uid: str, series_dir: Path) -> None:
        """One instance of the series was stored: (re)start its timer.

        The first instance of a burst also writes the ``received`` job record.
        """
        now = self.clock()
        with self._lock:
            p = self._pending.get(series_uid)
            first = p is None
            if first:
                p = self._pending[series_uid] = _Pending(study_uid, series_dir, now)
            p.last_seen = now
            p.count += 1
        if first:
            self.jobs.mark_received(series_uid, study_uid, series_dir)
            log_event(
                log,
                "series_receiving",
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
            )

    @property
    def pending(self) -> dict[str, float]:
        """Series still receiving: UID -> seconds since their last instance."""
        now = self.clock()
        with self._lock:
            return {k: now - p.last_seen for k, p in self._pending.items()}

    # ---- the timer ---------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Complete every series stable for ``series_stable_seconds``; returns their UIDs."""
        now = self.clock()
        with self._lock:
            done = [
                (uid, p)
                for uid, p in self._pending.items()
                if now - p.last_seen >= self.node.series_stable_seconds
            ]
            for uid, _ in done:
                del self._pending[uid]
        for uid, p in done:
            try:
                self.complete(uid, p.study_uid, p.series_dir)
            except Exception as exc:  # keep the watcher alive; the record says what failed
                log.exception("series_completion_failed")
                self.jobs.mark_failed(uid, f"completion failed: {exc}")
        return [uid for uid, _ in done]

    def complete(self, series_uid: str, study_uid: str, series_dir: Path) -> bool:
        """Apply the eligibility rules to a complete series and enqueue it if eligible.

        Returns
        -------
        bool
            True when the series was queued for analysis.
        """
        verdict = check_series(series_dir, self.node)
        if not verdict.eligible:
            self.jobs.mark_ineligible(series_uid, verdict.reason, verdict.n_instances)
            log_event(
                log,
                "series_ineligible",
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                reason=verdict.reason,
                instances=verdict.n_instances,
            )
            return False
        token = self.jobs.mark_queued(series_uid, verdict.n_instances)
        try:
            self.enqueue(series_dir, series_uid, token)
        except Exception as exc:  # broker down: the record stays queued, reconciliation re-sends
            log_event(
                log,
                "enqueue_failed",
                logging.WARNING,
                series_instance_uid=series_uid,
                error=f"{type(exc).__name__}: {exc}",
            )
            return True
        log_event(
            log,
            "series_queued",
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            instances=verdict.n_instances,
        )
        return True

    def recover(
        self,
        spool: Spool,
        enqueue_export: Callable[[str, str], None],
        requeue_running: bool = True,
    ) -> dict[str, str]:
        """Start-up: pick up every series that has work left after a restart.

        Series folders with no record or still ``received`` restart their timer (they may
        be incomplete). With ``requeue_running`` (the node's own workers died with it: the
        embedded broker), ``queued`` and ``analysing`` series are queued again and
        ``exporting`` series have their export queued again, each with a new token so that
        a surviving copy of the old message does nothing. Without it (Redis, separate
        workers that may still be running them) they are left to the periodic
        reconciliation, which re-queues only those whose record stopped moving.
        Returns series UID -> action taken.
        """
        records = {r.series_uid: r for r in self.jobs.list()}
        actions: dict[str, str] = {}
        for ref in spool.iter_series():
            rec = records.get(ref.series_uid)
            if rec is None or rec.state == jobstore.RECEIVED:
                self.touch(ref.study_uid, ref.series_uid, ref.path)
                actions[ref.series_uid] = "timer"
            elif not requeue_running:
                continue
            elif rec.state in (jobstore.QUEUED, jobstore.ANALYSING):
                token = self.jobs.mark_queued(ref.series_uid)
                self.enqueue(ref.path, ref.series_uid, token)
                actions[ref.series_uid] = "requeued"
            elif rec.state == jobstore.EXPORTING:
                enqueue_export(ref.series_uid, self.jobs.renew_token(ref.series_uid))
                actions[ref.series_uid] = "export_requeued"
        if actions:
            log_event(log, "recovered_series", count=len(actions))
        return actions

    def start(self) -> None:
        """Run :meth:`poll` every ``watcher_interval_seconds`` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="series-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (pending series stay pending; recovery picks them up)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = min(
            self.node.watcher_interval_seconds, max(self.node.series_stable_seconds, 0.05)
        )
        while not self._stop.wait(interval):
            self.poll()
