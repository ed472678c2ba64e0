"""Series completeness: a per-series inactivity timer, then eligibility and enqueueing.

A series is complete when no instance of it arrived for ``node.series_stable_seconds``
(like Orthanc's ``StableAge``). The timer belongs to the series, not to the association:
scanners send one series over several associations, or one instance per association
(pynetdicom#369, #855). An instance arriving after the series was queued starts the timer
again, and the series is analysed again when it is stable (tasks are idempotent).

:meth:`SeriesWatcher.touch` runs on the SCP's association threads, inside the C-STORE
handler, so it only updates memory: the ``received`` job record of a new series is written
by the watcher's own thread (:meth:`SeriesWatcher.record_received`), never by the thread that
owes the scanner its C-STORE response. The job database is shared with the workers, the
reconciliation and the CLI; a write there waits for SQLite's write lock (up to the
``timeout`` of :class:`core.jobs.JobStore`, 30 s), and a C-STORE handler that waited
with it made the scanner's DIMSE timeout (also 30 s) abort the association (issue 7,
``docs/reliability.md`` "The 30 s C-STORE stall").
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import NodeConfig
from core.jobs import OWNING_STATES, JobNotFoundError, JobRecord, JobState, JobStore
from core.logs import log_event
from service.audit import AuditLog
from service.eligibility import check_series
from service.spool import SeriesRef, Spool, instance_files

log = logging.getLogger(__name__)

#: ``enqueue(series_dir, series_uid, token)`` sends the analysis task.
Enqueue = Callable[[Path, str, str], None]


@dataclass
class _Pending:
    study_uid: str
    series_dir: Path
    last_seen: float
    count: int = 0
    #: every Study Instance UID the burst's instances came under (one, unless a sender
    #: reused the Series UID in another study)
    studies: set[str] = field(default_factory=set)


@dataclass
class _Received:
    """A ``received`` record not yet written: the first instance of a burst arrived."""

    study_uid: str
    series_dir: Path
    at: float  # Unix time (s) of that first instance


class SeriesWatcher:
    """Tracks series being received and hands complete, eligible ones to ``enqueue``.

    Parameters
    ----------
    node : ``node`` configuration (stable time, check interval, eligibility rules).
    jobs : the job records.
    enqueue : called once per complete eligible series (from the watcher thread).
    clock : monotonic clock in seconds (replaceable in tests).
    audit : where a quarantined series is audited (None: logged only).
    """

    def __init__(
        self,
        node: NodeConfig,
        jobs: JobStore,
        enqueue: Enqueue,
        clock: Callable[[], float] = time.monotonic,
        audit: AuditLog | None = None,
    ) -> None:
        self.node = node
        self.jobs = jobs
        self.enqueue = enqueue
        self.clock = clock
        self.audit = audit
        self.spool = Spool(node.spool_dir, node.resolved_quarantine_dir(), fsync=node.fsync)
        self._pending: dict[str, _Pending] = {}
        self._unrecorded: dict[str, _Received] = {}  # insertion order = arrival order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: called with the Series Instance UID of each series the timer completes (the SCP
        #: drops its per-series instance count); set by the node after the SCP starts.
        self.on_stable: Callable[[str], None] | None = None

    # ---- called from the SCP's association threads ------------------------------------

    def touch(self, study_uid: str, series_uid: str, series_dir: Path) -> None:
        """One instance of the series was stored: (re)start its timer.

        Runs on the association's thread inside the C-STORE handler: memory only, never
        the job database, the disk or the broker. The first instance of a burst queues a
        ``received`` job record for the watcher thread (:meth:`record_received`) and wakes
        it. A node that dies before the record is written loses nothing: the series is in
        the spool, and :meth:`recover` restarts the timer of a spooled series without a
        record.
        """
        now = self.clock()
        with self._lock:
            p = self._pending.get(series_uid)
            first = p is None
            if first:
                p = self._pending[series_uid] = _Pending(study_uid, series_dir, now)
                self._unrecorded.setdefault(
                    series_uid, _Received(study_uid, series_dir, time.time())
                )
            p.last_seen = now
            p.count += 1
            p.studies.add(study_uid)
        if first:
            self._wake.set()
            log_event(
                log,
                "series_receiving",
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
            )

    # ---- the watcher thread ------------------------------------------------------------

    def record_received(self) -> int:
        """Write the queued ``received`` job records (oldest first); returns how many.

        Called from the watcher thread (first thing in :meth:`poll`) and at :meth:`stop`.
        A record stays queued when the database refuses it (locked past the store's
        timeout) and is written on a later call; a series is not completed before its
        ``received`` record is written, so ``received`` never lands after ``queued``.
        """
        written = 0
        while True:
            with self._lock:
                if not self._unrecorded:
                    return written
                series_uid, rec = next(iter(self._unrecorded.items()))
            try:
                settled = self.jobs.mark_received(
                    series_uid, rec.study_uid, rec.series_dir, received_at=rec.at
                )
                if not settled:
                    log_event(
                        log,
                        "series_uid_reused",
                        logging.WARNING,
                        study_instance_uid=rec.study_uid,
                        series_instance_uid=series_uid,
                    )
            except sqlite3.Error as exc:
                log_event(
                    log,
                    "received_record_deferred",
                    logging.WARNING,
                    series_instance_uid=series_uid,
                    error=f"{type(exc).__name__}: {exc}",
                )
                return written
            with self._lock:
                if self._unrecorded.get(series_uid) is rec:
                    del self._unrecorded[series_uid]
            written += 1

    @property
    def pending(self) -> dict[str, float]:
        """Series still receiving: UID -> seconds since their last instance."""
        now = self.clock()
        with self._lock:
            return {k: now - p.last_seen for k, p in self._pending.items()}

    # ---- the timer ---------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Write queued ``received`` records, then complete every series stable for
        ``series_stable_seconds`` (and whose ``received`` record is written); returns the
        UIDs of the completed series."""
        self.record_received()
        now = self.clock()
        with self._lock:
            done = [
                (uid, p)
                for uid, p in self._pending.items()
                if now - p.last_seen >= self.node.series_stable_seconds
                and uid not in self._unrecorded
            ]
            for uid, _ in done:
                del self._pending[uid]
        for uid, p in done:
            if self.on_stable is not None:
                self.on_stable(uid)
            try:
                owner = self.settle_identity(uid, p)
                if owner is not None:
                    self.complete(uid, owner.study_uid, owner.path)
            except Exception as exc:  # keep the watcher alive; the record says what failed
                log.exception("series_completion_failed")
                self.jobs.mark_failed(uid, f"completion failed: {exc}")
        return [uid for uid, _ in done]

    def settle_identity(self, series_uid: str, pending: _Pending) -> SeriesRef | None:
        """One Series Instance UID, one study: quarantine the instances filed under another.

        Jobs are keyed by Series Instance UID, the spool by Study and Series; a sender that
        reuses a Series UID under another study (a stray slice, a mis-merged study) would
        otherwise mix two series in one job or overwrite a finished job (issue 14, defect 3).
        The owner is the study of a series already queued or analysed (its record's study:
        a finished job is never changed by a stray), else the study with the most instances.
        Every other folder of the Series UID goes to quarantine with its reason, is logged
        and audited; nothing is deleted.

        Returns
        -------
        The owner's folder to complete, or None when this burst brought nothing to the owner
        (only strays arrived: the finished job stays as it was).
        """
        spool = self.spool
        folders = spool.series_folders(series_uid)
        record = self._record(series_uid)
        if record is not None and record.study_uid and record.state in OWNING_STATES:
            owner_study = record.study_uid
        elif folders:
            owner_study = max(
                folders,
                key=lambda f: (len(instance_files(f.path)), f.study_uid == pending.study_uid),
            ).study_uid
        else:  # the spool lies elsewhere (tests): the burst's own folder
            owner_study = pending.study_uid
        for ref in folders:
            if ref.study_uid == owner_study:
                continue
            reason = (
                f"Series Instance UID {series_uid} already belongs to study {owner_study}; "
                f"these instances came under study {ref.study_uid}"
            )
            context = {"study_instance_uid": ref.study_uid, "series_instance_uid": series_uid}
            target = spool.quarantine_folder(ref.path, reason, context)
            log_event(
                log,
                "series_uid_reused_quarantined",
                logging.WARNING,
                owner_study_instance_uid=owner_study,
                quarantine=str(target),
                reason=reason,
                **context,
            )
            if self.audit is not None:
                self.audit.record(event="series_quarantined", outcome="quarantined", reason=reason)
        owner = next((f for f in folders if f.study_uid == owner_study), None)
        if owner is None and not folders and owner_study == pending.study_uid:
            owner = SeriesRef(pending.study_uid, series_uid, pending.series_dir)
        if owner is None or owner_study not in pending.studies:
            return None  # only strays in this burst: the owner's job is left as it was
        if record is not None and record.study_uid != owner_study:
            self.jobs.set_study(series_uid, owner_study, owner.path)
        return owner

    def _record(self, series_uid: str) -> JobRecord | None:
        try:
            return self.jobs.get(series_uid)
        except JobNotFoundError:
            return None

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
            if rec is None or rec.state == JobState.RECEIVED:
                self.touch(ref.study_uid, ref.series_uid, ref.path)
                actions[ref.series_uid] = "timer"
            elif not requeue_running:
                continue
            elif rec.state in (JobState.QUEUED, JobState.ANALYSING):
                token = self.jobs.mark_queued(ref.series_uid)
                self.enqueue(ref.path, ref.series_uid, token)
                actions[ref.series_uid] = "requeued"
            elif rec.state == JobState.EXPORTING:
                enqueue_export(ref.series_uid, self.jobs.renew_token(ref.series_uid))
                actions[ref.series_uid] = "export_requeued"
        if actions:
            log_event(log, "recovered_series", count=len(actions))
        return actions

    def start(self) -> None:
        """Run :meth:`poll` every ``watcher_interval_seconds`` (and whenever a new series
        starts arriving) in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="series-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then write the queued ``received`` records (best effort).

        Pending series stay pending; recovery picks them up at the next start.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=40)
        self.record_received()

    def _run(self) -> None:
        interval = min(
            self.node.watcher_interval_seconds, max(self.node.series_stable_seconds, 0.05)
        )
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll()
            except Exception:  # keep watching (a locked database, a vanished folder, ...)
                log.exception("watcher_poll_failed")
