"""Retention: delete what the node no longer needs, by age and by storage watermark (issue 16).

Without it the spool and the results grow until ``node.min_free_disk_mb`` makes the node
refuse scanners. Like Orthanc's ``MaximumStorageSize`` (oldest first, until under the
limit) and mercure's retention (by age, only once a series' work is done), with one rule
above all: **nothing that still has work to do is deleted**. A series' files may go only when
its job is ``done``, ``failed`` or ``ineligible`` and every export of it is ``done``
(:func:`why_kept`); a series being received, queued, analysed or exported, with an export
pending, retrying or failed, or without a job record is kept, whatever its age or the disk.

Three kinds of entries (:class:`Entry`):

``spool``       ``<spool>/<Study>/<Series>/``: the CT as received (the bulk of the bytes)
``results``     ``<results>/<Series>/``: SEG, SR, SC, overview and ``result.json``
``quarantine``  ``<quarantine>/<stem>.*``: refused inputs and stray series, with their reason

Two rules (:func:`select`):

1. **Age.** An entry whose last activity (its job record's latest timestamp, or the newest
   file in it, whichever is later) is older than ``retention.spool_max_age_days``,
   ``results_max_age_days`` or ``quarantine_max_age_days`` goes.
2. **Watermarks.** When spool + results + quarantine exceed ``retention.max_storage_gb``, or
   the spool's file system has less than ``retention.min_free_disk_gb`` free, deletable
   spool folders go oldest first, then deletable results folders, until the storage is under
   ``low_watermark_fraction`` x the limit (or the free space above limit / fraction).
   Quarantine entries go by age only. When the deletable entries are not enough, one
   warning says how much could not be freed and why the rest is kept.

A folder written to in the last :data:`RECENT_WRITE_GUARD_S` and a series the node's
watcher holds (arriving, completing) are never deleted: instances of a new burst of a
finished series may be arriving before its record says so. A deleted spool folder leaves the
SCP's SOP index (:meth:`service.spool.Spool.remove_series`), so the same instances can be
stored again later; the job record keeps its state and gets ``spool_purged_at`` /
``results_purged_at`` (``l3spot jobs`` says "purged"). Every deletion is one log line
(``retention_deleted``, with the UIDs, age, bytes and reason) and one audit record.

The node runs it every ``retention.interval_minutes`` (:class:`RetentionThread`);
``l3spot retention [--dry-run]`` runs it by hand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config import Config, RetentionConfig
from core.jobs import ExportState, JobNotFoundError, JobRecord, JobState, JobStore
from core.logs import log_event
from service.audit import AuditLog
from service.spool import TMP_PREFIX, SeriesBusyError, Spool, folder_bytes, is_valid_uid

log = logging.getLogger(__name__)

GIB = 1024**3
DAY_S = 86400.0
#: A folder with a file written less than this long ago (s) is never deleted: instances of a
#: new burst of a finished series may be arriving before the watcher records it, and a run
#: by ``l3spot retention`` (another process) cannot ask the watcher.
RECENT_WRITE_GUARD_S = 3600.0
#: The node's first run comes this long (s) after its start (at most ``interval_minutes``).
FIRST_RUN_DELAY_S = 300.0
#: Job states whose series may be deleted once every export is ``done``.
DELETABLE_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.INELIGIBLE})

Kind = Literal["spool", "results", "quarantine"]
#: Watermark deletions take the bulky CT first, the small results after.
_WATERMARK_ORDER: tuple[Kind, ...] = ("spool", "results")


def why_kept(rec: JobRecord | None) -> str | None:
    """Why a series' files must stay, or None when retention may delete them.

    Parameters
    ----------
    rec : the series' job record (None: there is none).

    Returns
    -------
    str or None
        ``"no job record"``, ``"job received"`` (any state outside :data:`DELETABLE_STATES`),
        ``"export to AE@host:port failed"`` (an export row not ``done``), or None.
    """
    if rec is None:
        return "no job record"
    if rec.state not in DELETABLE_STATES:
        return f"job {rec.state}"
    for e in rec.exports:
        if e.state != ExportState.DONE:
            return f"export to {e.destination} {e.state}"
    return None


@dataclass(frozen=True)
class Entry:
    """One deletable unit: a series' spool folder, its results folder, or a quarantine item.

    Attributes
    ----------
    kind : ``spool``, ``results`` or ``quarantine``.
    paths : what is deleted (one folder; for quarantine the data and its reason file).
    bytes : apparent size of the files.
    written_at : Unix time (s) of the newest file (or folder change).
    last_activity : ``written_at`` or the job record's latest timestamp, whichever is later.
    series_uid, study_uid : UIDs ("" for quarantine items).
    """

    kind: Kind
    paths: tuple[Path, ...]
    bytes: int
    written_at: float
    last_activity: float
    series_uid: str = ""
    study_uid: str = ""

    @property
    def label(self) -> str:
        """``Study/Series`` for spool entries, the Series UID for results, else the name."""
        if self.kind == "spool":
            return f"{self.study_uid}/{self.series_uid}"
        return self.series_uid or self.paths[0].name

    def age_days(self, now: float) -> float:
        """Days since :attr:`last_activity`."""
        return (now - self.last_activity) / DAY_S


@dataclass(frozen=True)
class Deletion:
    """An entry retention deletes (or would delete, in a dry run), and why."""

    entry: Entry
    why: str
    age_days: float


@dataclass
class Selection:
    """What :func:`select` decided.

    Attributes
    ----------
    deletions : in the order they are carried out (age first, then watermark, oldest first).
    kept : entries that must stay, with the reason (:func:`why_kept` and the guards).
    usage_bytes : spool + results + quarantine before deleting.
    need_bytes : bytes the watermarks still wanted freed after every deletion (0: reached).
    """

    deletions: list[Deletion] = field(default_factory=list)
    kept: list[tuple[Entry, str]] = field(default_factory=list)
    usage_bytes: int = 0
    need_bytes: int = 0


def _newest_mtime(paths: Iterable[Path]) -> float:
    newest = 0.0
    for top in paths:
        with contextlib.suppress(OSError):
            newest = max(newest, top.stat().st_mtime)
        for dirpath, dirs, names in os.walk(top):
            for name in (*dirs, *names):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _paths_bytes(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += folder_bytes(p)
        else:
            with contextlib.suppress(OSError):
                total += p.stat().st_size
    return total


def scan(config: Config, records: dict[str, JobRecord], spool: Spool) -> list[Entry]:
    """Every spool series folder, results folder and quarantine item, with size and times.

    Parameters
    ----------
    config : ``node`` (the folders).
    records : job records by Series Instance UID.
    spool : the node's spool.

    Returns
    -------
    list[Entry]
        In no particular order; temporary files and folders (``.tmp-*``) are left out.
    """
    entries: list[Entry] = []

    def add(kind: Kind, paths: tuple[Path, ...], series: str = "", study: str = "") -> None:
        written = _newest_mtime(paths)
        rec = records.get(series)
        activity = max(written, rec.last_activity) if rec is not None else written
        entries.append(Entry(kind, paths, _paths_bytes(paths), written, activity, series, study))

    for ref in spool.iter_series():
        add("spool", (ref.path,), ref.series_uid, ref.study_uid)
    results_root = config.node.resolved_results_dir()
    if results_root.is_dir():
        for folder in results_root.iterdir():
            if folder.is_dir() and is_valid_uid(folder.name):
                rec = records.get(folder.name)
                add("results", (folder,), folder.name, rec.study_uid if rec else "")
    quarantine = config.node.resolved_quarantine_dir()
    if quarantine.is_dir():
        groups: dict[str, list[Path]] = {}
        for p in quarantine.iterdir():
            if not p.name.startswith("."):
                groups.setdefault(p.name.split(".", 1)[0], []).append(p)
        for _, members in sorted(groups.items()):
            add("quarantine", tuple(sorted(members)))
    return entries


def select(
    cfg: RetentionConfig,
    entries: list[Entry],
    records: dict[str, JobRecord],
    now: float,
    free_bytes: int | None,
    busy: frozenset[str] | set[str] = frozenset(),
) -> Selection:
    """Decide what goes: the age rule, then the watermarks, oldest first (module docstring).

    Parameters
    ----------
    cfg : the ``retention`` section.
    entries : from :func:`scan`.
    records : job records by Series Instance UID.
    now : Unix time (s).
    free_bytes : free bytes of the spool's file system (None: not known, no free-disk rule).
    busy : Series UIDs the watcher holds (never deleted).

    Returns
    -------
    Selection
    """
    sel = Selection(usage_bytes=sum(e.bytes for e in entries))
    deletable: list[Entry] = []
    for e in entries:
        reason = None
        if e.kind != "quarantine":
            if e.series_uid in busy:
                reason = "series being received"
            elif now - e.written_at < RECENT_WRITE_GUARD_S:
                reason = f"written to in the last {RECENT_WRITE_GUARD_S / 3600:g} h"
            else:
                reason = why_kept(records.get(e.series_uid))
        if reason is None:
            deletable.append(e)
        else:
            sel.kept.append((e, reason))

    max_age = {
        "spool": cfg.spool_max_age_days,
        "results": cfg.results_max_age_days,
        "quarantine": cfg.quarantine_max_age_days,
    }
    chosen: set[int] = set()
    freed = 0
    for e in sorted(deletable, key=lambda x: x.last_activity):
        days = max_age[e.kind]
        if days is not None and e.age_days(now) > days:
            sel.deletions.append(
                Deletion(e, f"older than retention.{e.kind}_max_age_days={days:g}", e.age_days(now))
            )
            chosen.add(id(e))
            freed += e.bytes

    need, why = 0, ""
    if cfg.max_storage_gb is not None and sel.usage_bytes > cfg.max_storage_gb * GIB:
        need = int(sel.usage_bytes - cfg.low_watermark_fraction * cfg.max_storage_gb * GIB)
        why = (
            f"storage {sel.usage_bytes / GIB:.2f} GiB above "
            f"retention.max_storage_gb={cfg.max_storage_gb:g}"
        )
    if (
        cfg.min_free_disk_gb is not None
        and free_bytes is not None
        and free_bytes < cfg.min_free_disk_gb * GIB
    ):
        free_need = int(cfg.min_free_disk_gb * GIB / cfg.low_watermark_fraction - free_bytes)
        if free_need > need:
            need = free_need
            why = (
                f"free disk {free_bytes / GIB:.2f} GiB below "
                f"retention.min_free_disk_gb={cfg.min_free_disk_gb:g}"
            )
    need -= freed
    for kind in _WATERMARK_ORDER:
        for e in sorted(deletable, key=lambda x: x.last_activity):
            if need <= 0:
                break
            if e.kind == kind and id(e) not in chosen:
                sel.deletions.append(Deletion(e, why, e.age_days(now)))
                chosen.add(id(e))
                need -= e.bytes
    sel.need_bytes = max(need, 0)
    return sel


@dataclass
class RetentionReport:
    """The outcome of one run (:func:`run_retention`)."""

    dry_run: bool
    selection: Selection
    free_bytes: int | None
    #: deletions carried out (all of the selection's in a dry run: what would be deleted)
    done: list[Deletion] = field(default_factory=list)
    #: deletions skipped at the last check or failed, with the reason
    skipped: list[tuple[Deletion, str]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        """Bytes freed (or that would be, in a dry run)."""
        return sum(d.entry.bytes for d in self.done)


def _delete_tree(path: Path) -> None:
    """Rename ``path`` beside itself (atomic: it vanishes at once), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f"{TMP_PREFIX}purge-{uuid.uuid4().hex[:12]}")
    os.replace(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _delete(
    d: Deletion,
    store: JobStore,
    spool: Spool,
    busy: Callable[[], set[str]],
    now: float,
) -> str | None:
    """Carry out one deletion; returns why it was skipped, or None when done."""
    e = d.entry
    if e.kind == "quarantine":
        for p in e.paths:
            _delete_tree(p)
        return None
    try:  # the state may have moved since the scan (a retry, a new burst)
        rec: JobRecord | None = store.get(e.series_uid)
    except JobNotFoundError:
        rec = None
    reason = why_kept(rec)
    if reason is None and e.series_uid in busy():
        reason = "series being received"
    if reason is None and now - _newest_mtime(e.paths) < RECENT_WRITE_GUARD_S:
        reason = "written to since the scan"
    if reason is not None:
        return reason
    if e.kind == "spool":
        try:
            spool.remove_series(e.study_uid, e.series_uid)
        except SeriesBusyError:
            return "an instance is being written"
        if not spool.series_folders(e.series_uid):
            store.mark_purged(e.series_uid, spool=True)
    else:
        _delete_tree(e.paths[0])
        store.mark_purged(e.series_uid, results=True)
    return None


def run_retention(
    config: Config,
    store: JobStore,
    spool: Spool,
    audit: AuditLog | None = None,
    dry_run: bool = False,
    busy: Callable[[], set[str]] = set,
    now: float | None = None,
) -> RetentionReport:
    """Scan, select and (unless ``dry_run``) delete; log and audit every deletion.

    Parameters
    ----------
    config : the configuration (``retention``, ``node`` folders).
    store : the job records.
    spool : the node's spool (its SOP index is kept up to date).
    audit : where each deletion is audited (None: logged only).
    dry_run : only report what would be deleted.
    busy : returns the Series UIDs the watcher holds (the node passes
        :meth:`service.watcher.SeriesWatcher.busy_series`).
    now : Unix time (s) of the run (default: now; tests).

    Returns
    -------
    RetentionReport
    """
    now = time.time() if now is None else now
    records = {r.series_uid: r for r in store.list()}
    entries = scan(config, records, spool)
    try:
        free: int | None = shutil.disk_usage(spool.root).free
    except OSError:
        free = None
    sel = select(config.retention, entries, records, now, free, frozenset(busy()))
    report = RetentionReport(dry_run, sel, free)
    for d in sel.deletions:
        if dry_run:
            report.done.append(d)
            continue
        try:
            skipped = _delete(d, store, spool, busy, now)
        except OSError as exc:
            skipped = f"{type(exc).__name__}: {exc}"
        if skipped is not None:
            report.skipped.append((d, skipped))
            continue
        report.done.append(d)
        e = d.entry
        log_event(
            log,
            "retention_deleted",
            kind=e.kind,
            study_instance_uid=e.study_uid or None,
            series_instance_uid=e.series_uid or None,
            path=str(e.paths[0]),
            bytes_freed=e.bytes,
            age_days=round(d.age_days, 1),
            reason=d.why,
        )
        if audit is not None:
            audit.record(
                event="retention_deleted",
                outcome="deleted",
                purged=e.kind,
                study_instance_uid=e.study_uid or None,
                series_instance_uid=e.series_uid or None,
                bytes_freed=e.bytes,
                age_days=round(d.age_days, 1),
                reason=d.why,
            )
    kept_reasons: dict[str, int] = {}
    for _, reason in sel.kept:
        kept_reasons[reason] = kept_reasons.get(reason, 0) + 1
    if sel.need_bytes > 0:
        log_event(
            log,
            "retention_watermark_unreachable",
            logging.WARNING,
            still_to_free_bytes=sel.need_bytes,
            kept=kept_reasons,
        )
    log_event(
        log,
        "retention_run",
        dry_run=dry_run,
        deleted=len(report.done),
        bytes_freed=report.freed_bytes,
        skipped=len(report.skipped),
        storage_bytes=sel.usage_bytes,
        free_bytes=free,
        kept=len(sel.kept),
    )
    return report


def format_report(report: RetentionReport) -> str:
    """Plain-text report for ``l3spot retention``: one line per deletion, then totals."""
    verb = "would delete" if report.dry_run else "deleted"
    lines = []
    for d in report.done:
        e = d.entry
        lines.append(
            f"{verb:12}  {e.kind:10}  {e.label}  age {d.age_days:.1f} d  "
            f"{e.bytes / 1e6:.1f} MB  {d.why}"
        )
    for d, why in report.skipped:
        lines.append(f"{'skipped':12}  {d.entry.kind:10}  {d.entry.label}  {why}")
    sel = report.selection
    free = f"{report.free_bytes / GIB:.2f} GiB" if report.free_bytes is not None else "unknown"
    lines.append(
        f"total: {len(report.done)} {verb}, {report.freed_bytes / 1e6:.1f} MB; "
        f"storage {sel.usage_bytes / GIB:.2f} GiB, free {free}; "
        f"{len(sel.kept)} kept (in progress, not exported, recent or without a record)"
    )
    if sel.need_bytes > 0:
        lines.append(
            f"warning: the watermark is not reached: {sel.need_bytes / 1e6:.1f} MB more would "
            "have to go, but the rest is not deletable"
        )
    return "\n".join(lines)


class RetentionThread:
    """Runs :func:`run_retention` every ``retention.interval_minutes`` in a daemon thread.

    Parameters
    ----------
    config, store, spool, audit, busy : as for :func:`run_retention`.
    """

    def __init__(
        self,
        config: Config,
        store: JobStore,
        spool: Spool,
        audit: AuditLog | None,
        busy: Callable[[], set[str]],
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.audit = audit
        self.busy = busy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        """Start the thread; the first run comes after :data:`FIRST_RUN_DELAY_S`."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (a run in progress finishes its current deletion first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        interval = self.config.retention.interval_minutes * 60.0
        delay = min(FIRST_RUN_DELAY_S, interval)
        while not self._stop.wait(delay):
            delay = interval
            try:
                run_retention(self.config, self.store, self.spool, self.audit, busy=self.busy)
            except Exception:  # keep the thread alive (a locked database, a vanished folder)
                log.exception("retention_failed")


def start_retention(
    config: Config,
    store: JobStore,
    spool: Spool,
    audit: AuditLog | None,
    busy: Callable[[], set[str]],
) -> RetentionThread | None:
    """The node's retention thread, started; None when ``retention.enabled`` is false."""
    if not config.retention.enabled:
        return None
    thread = RetentionThread(config, store, spool, audit, busy)
    thread.start()
    return thread
