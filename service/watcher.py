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

A state change is durable before the watcher forgets a series (issue 16, "Disk full"): a
series whose ``queued``/``ineligible`` record cannot be written (the disk is full, the
database is locked past its timeout) stays in the watcher's table and is tried again after a
back-off (1, 2, 4 ... :data:`RETRY_MAX_S` s); a series whose analysis message the broker
refused keeps its token and is sent again the same way. One warning per
:data:`WARN_EVERY_S` tells the operator (not one per tick), one line says when it recovered,
and :meth:`SeriesWatcher.health` tells the web page's health check. A ``received`` record
that no watcher entry holds (lost before this fix, or by a node that died) is adopted again
by the node's reconciliation (:meth:`SeriesWatcher.adopt_orphans`).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import NodeConfig
from core.jobs import (
    DATABASE_ERRORS,
    OWNING_STATES,
    TRANSIENT_DATABASE_ERRORS,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
)
from core.logs import log_event
from service.audit import AuditLog
from service.eligibility import check_series
from service.spool import SeriesRef, Spool, instance_files

log = logging.getLogger(__name__)

#: ``enqueue(series_dir, series_uid, token)`` sends the analysis task.
Enqueue = Callable[[Path, str, str], None]

#: Seconds between two warnings of the same kind of failure (the watcher retries every tick).
WARN_EVERY_S = 60.0
#: Longest back-off (s) between two attempts to record or enqueue one series.
RETRY_MAX_S = 60.0
#: A ``received`` record untouched for ``series_stable_seconds`` plus this (s) and held by no
#: watcher entry is adopted by the reconciliation (:meth:`SeriesWatcher.adopt_orphans`).
ORPHAN_GRACE_S = 60.0
#: ``OSError`` numbers that pass when an operator frees space or the storage comes back.
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def is_storage_error(exc: BaseException) -> bool:
    """True for a failure of the disk or of the job database that may pass by itself.

    ``sqlite3.OperationalError`` ("database or disk is full", "database is locked", "disk
    I/O error"), PostgreSQL's operational errors (server unreachable or restarting, a row
    lock held past ``lock_timeout``: :data:`core.jobs.TRANSIENT_DATABASE_ERRORS`) and
    ``OSError`` with ``ENOSPC``, ``EDQUOT``, ``EIO`` or ``EROFS``.
    """
    if isinstance(exc, TRANSIENT_DATABASE_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


@dataclass(frozen=True)
class WatcherHealth:
    """What the watcher tells a health check (:meth:`SeriesWatcher.health`).

    Attributes
    ----------
    ok : no series waits for a failed database write or a refused publish.
    last_error : the last such failure (``event: Type: message``), kept after recovery.
    last_error_at : Unix time (s) of ``last_error``.
    waiting : Series Instance UIDs waiting to be recorded or enqueued after a failure.
    """

    ok: bool
    last_error: str | None
    last_error_at: float | None
    waiting: list[str]


@dataclass
class _Pending:
    study_uid: str
    series_dir: Path
    last_seen: float
    count: int = 0
    #: every Study Instance UID the burst's instances came under (one, unless a sender
    #: reused the Series UID in another study)
    studies: set[str] = field(default_factory=set)
    #: failed attempts to record the series' completion; the next one not before ``retry_at``
    #: (the watcher's clock)
    attempts: int = 0
    retry_at: float = 0.0


@dataclass
class _Unsent:
    """A series recorded ``queued`` whose analysis message the broker refused."""

    study_uid: str
    series_dir: Path
    token: str
    instances: int
    attempts: int = 1
    retry_at: float = 0.0


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
        self._inflight: set[str] = set()  # being completed by poll (out of _pending)
        self._unsent: dict[str, _Unsent] = {}
        self._waiting: set[str] = set()  # series whose write or publish failed, not yet done
        self._last_error: tuple[str, float] | None = None
        self._warned_at: dict[str, float] = {}  # event -> watcher clock of its last warning
        self._suppressed: dict[str, int] = {}  # event -> warnings not logged since
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
            except DATABASE_ERRORS as exc:
                self._failed("received_record_deferred", series_uid, exc)
                return written
            with self._lock:
                if self._unrecorded.get(series_uid) is rec:
                    del self._unrecorded[series_uid]
            self._succeeded(series_uid)
            written += 1

    @property
    def pending(self) -> dict[str, float]:
        """Series still receiving: UID -> seconds since their last instance."""
        now = self.clock()
        with self._lock:
            return {k: now - p.last_seen for k, p in self._pending.items()}

    # ---- the timer ---------------------------------------------------------------------

    def poll(self) -> list[str]:
        """One turn of the watcher thread; returns the UIDs of the stable series it took up
        (completed, or put back for a later turn after a storage error).

        Writes the queued ``received`` records, then completes every series stable for
        ``series_stable_seconds`` (whose ``received`` record is written and whose back-off
        after a failure is over), then re-sends the analysis messages the broker refused.
        A series whose new state cannot be written (:func:`is_storage_error`) stays in the
        table and is tried again later: it is never forgotten before its state is durable.
        """
        self.record_received()
        now = self.clock()
        with self._lock:
            done = [
                (uid, p)
                for uid, p in self._pending.items()
                if now - p.last_seen >= self.node.series_stable_seconds
                and now >= p.retry_at
                and uid not in self._unrecorded
            ]
            for uid, _ in done:
                del self._pending[uid]
                self._inflight.add(uid)
        for uid, p in done:
            try:
                self._finish(uid, p)
            finally:
                with self._lock:
                    self._inflight.discard(uid)
        self._resend_unsent()
        return [uid for uid, _ in done]

    def _finish(self, uid: str, p: _Pending) -> None:
        """Settle, check and enqueue one stable series; on a storage error keep it for later."""
        if self.on_stable is not None:
            self.on_stable(uid)
        try:
            owner = self.settle_identity(uid, p)
            if owner is not None:
                self.complete(uid, owner.study_uid, owner.path)
        except Exception as exc:
            if not is_storage_error(exc):
                # keep the watcher alive; the record says what failed
                log.exception("series_completion_failed")
                try:
                    self.jobs.mark_failed(uid, f"completion failed: {exc}")
                except Exception as write_exc:
                    if not is_storage_error(write_exc):
                        raise
                    exc = write_exc
                else:
                    self._succeeded(uid)
                    return
            self._keep(uid, p)
            self._failed("series_completion_deferred", uid, exc)
            return
        self._succeeded(uid)

    def _keep(self, uid: str, p: _Pending) -> None:
        """Put a series whose completion failed back in the table, with a back-off."""
        p.attempts += 1
        p.retry_at = self.clock() + min(RETRY_MAX_S, 2.0 ** (p.attempts - 1))
        with self._lock:
            newer = self._pending.get(uid)
            if newer is None:  # nothing arrived meanwhile
                self._pending[uid] = p
            else:  # a new burst started: it completes with this one's instances too
                newer.count += p.count
                newer.studies |= p.studies
                newer.attempts, newer.retry_at = p.attempts, p.retry_at

    def _resend_unsent(self) -> None:
        """Send again the analysis messages the broker refused (back-off per series).

        A series whose record is no longer ``queued`` with the same token (re-queued by the
        reconciliation or an operator, analysed meanwhile) is dropped. The first failure
        ends the turn: the broker is still down, the others wait for the next one.
        """
        now = self.clock()
        with self._lock:
            due = [(uid, u) for uid, u in self._unsent.items() if now >= u.retry_at]
        for uid, u in due:
            try:
                rec = self._record(uid)
                if rec is None or rec.state != JobState.QUEUED or rec.token != u.token:
                    with self._lock:
                        if self._unsent.get(uid) is u:
                            del self._unsent[uid]
                    self._succeeded(uid)
                    continue
                self.enqueue(u.series_dir, uid, u.token)
            except Exception as exc:
                u.attempts += 1
                u.retry_at = self.clock() + min(RETRY_MAX_S, 2.0 ** (u.attempts - 1))
                self._failed("enqueue_failed", uid, exc)
                return
            with self._lock:
                if self._unsent.get(uid) is u:
                    del self._unsent[uid]
            self._succeeded(uid)
            log_event(
                log,
                "series_queued",
                study_instance_uid=u.study_uid,
                series_instance_uid=uid,
                instances=u.instances,
                attempts=u.attempts + 1,
            )

    # ---- failures: rate-limited warnings and the health check's view ---------------------

    def _failed(self, event: str, series_uid: str, exc: BaseException) -> None:
        """Remember a failed write or publish; log it at most once per :data:`WARN_EVERY_S`."""
        error = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        with self._lock:
            self._waiting.add(series_uid)
            self._last_error = (f"{event}: {error}", time.time())
            last = self._warned_at.get(event)
            if last is not None and now - last < WARN_EVERY_S:
                self._suppressed[event] = self._suppressed.get(event, 0) + 1
                return
            self._warned_at[event] = now
            suppressed = self._suppressed.pop(event, 0)
            waiting = len(self._waiting)
        log_event(
            log,
            event,
            logging.WARNING,
            series_instance_uid=series_uid,
            error=error,
            series_waiting=waiting,
            repeats_not_logged=suppressed,
            retry_within_s=RETRY_MAX_S,
        )

    def _succeeded(self, series_uid: str) -> None:
        """A series' state is durable (and its message sent); log when the last one is."""
        with self._lock:
            if series_uid not in self._waiting or series_uid in self._unsent:
                return  # still waiting for its message to be sent
            self._waiting.discard(series_uid)
            recovered = not self._waiting
            if recovered:
                self._warned_at.clear()
                self._suppressed.clear()
        if recovered:
            log_event(log, "watcher_storage_recovered", series_instance_uid=series_uid)

    def health(self) -> WatcherHealth:
        """The watcher's view for a health check: does any series wait after a failure?

        Returns
        -------
        WatcherHealth
            ``ok`` False while a series waits for a failed database write or a refused
            publish to succeed; ``last_error`` and ``last_error_at`` describe the last
            failure (kept after recovery, for the operator).
        """
        with self._lock:
            last = self._last_error
            return WatcherHealth(
                ok=not self._waiting,
                last_error=last[0] if last else None,
                last_error_at=last[1] if last else None,
                waiting=sorted(self._waiting),
            )

    @property
    def last_error(self) -> str | None:
        """The last failed database write or publish (``event: Type: message``), or None."""
        return self.health().last_error

    def busy_series(self) -> set[str]:
        """Series Instance UIDs the watcher holds (arriving, completing, waiting to be
        recorded or sent): retention never deletes these."""
        with self._lock:
            return {*self._pending, *self._unrecorded, *self._inflight, *self._unsent}

    def adopt_orphans(self, now: float | None = None) -> dict[str, str]:
        """Restart the timer of ``received`` series that no watcher entry holds.

        Called by the node's reconciliation. A ``received`` record last updated more than
        ``series_stable_seconds`` + :data:`ORPHAN_GRACE_S` before ``now`` whose series the
        watcher does not hold was lost (a node before the issue 16 fix, a failed recovery):
        its timer starts again, so it is completed and queued without a new C-STORE. One
        whose instances are in no spool folder any more ends ``failed``.

        Parameters
        ----------
        now : Unix time (s) of the check (default: now).

        Returns
        -------
        dict[str, str]
            Series UID -> ``"timer"`` or ``"failed"``.
        """
        now = time.time() if now is None else now
        cutoff = now - self.node.series_stable_seconds - ORPHAN_GRACE_S
        actions: dict[str, str] = {}
        for rec in self.jobs.list((JobState.RECEIVED,)):
            if rec.updated_at >= cutoff:
                continue
            uid = rec.series_uid
            if uid in self.busy_series():
                continue
            fresh = self._record(uid)  # not completed between the list and the check above
            if fresh is None or fresh.state != JobState.RECEIVED:
                continue
            folder = self.spool.series_path(uid, fresh.series_dir)
            if folder is None:
                self.jobs.mark_failed(uid, "series not in the spool")
                actions[uid] = "failed"
                continue
            self.touch(fresh.study_uid or folder.parent.name, uid, folder)
            actions[uid] = "timer"
        if actions:
            log_event(log, "received_series_adopted", logging.WARNING, series=actions)
        return actions

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
        with self._lock:
            self._unsent.pop(series_uid, None)  # a new burst: its new token supersedes
        token = self.jobs.mark_queued(series_uid, verdict.n_instances)
        try:
            self.enqueue(series_dir, series_uid, token)
        except Exception as exc:  # broker down: the record stays queued; sent again later
            with self._lock:
                self._unsent[series_uid] = _Unsent(
                    study_uid, series_dir, token, verdict.n_instances, retry_at=self.clock() + 1
                )
            self._failed("enqueue_failed", series_uid, exc)
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
                try:
                    self.enqueue(ref.path, ref.series_uid, token)
                except Exception as exc:  # broker not up yet: the watcher sends it later
                    with self._lock:
                        self._unsent[ref.series_uid] = _Unsent(
                            ref.study_uid, ref.path, token, rec.n_instances
                        )
                    self._failed("enqueue_failed", ref.series_uid, exc)
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
