"""Job records: one row per series, in a small SQLite database inside the spool folder.

The job record, not Celery's result backend, is the truth about a series: the node writes
``received``/``ineligible``/``queued``, the workers write ``analysing``/``exporting``/``done``/
``failed``. The database survives restarts of the node and of the workers, and several
processes on one host may use it at once (SQLite WAL mode, ``BEGIN IMMEDIATE`` writers).

It lives in :mod:`core` because both sides write it; :mod:`service.jobs` re-exports it for
the node. The states are :class:`JobState` members (a ``StrEnum``: stored as their strings).
Records hold UIDs, states, reasons and timings only, never patient name, ID or birth date.

States (in the order a series passes through them)::

    received -> queued -> analysing -> exporting -> done
           \\-> ineligible (reason)          \\-> failed (reason)
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from core.errors import JobNotFoundError

DB_NAME = "jobs.sqlite"
#: Seconds a statement waits for another connection's lock before ``database is locked``.
#: Never wait like this on a thread that owes a DICOM peer a response (the SCP's C-STORE
#: handler): scanners' DIMSE timeouts are typically 30 s too (docs/reliability.md).
BUSY_TIMEOUT_S = 30.0


class JobState(StrEnum):
    """The state of a series' job record, in the order a series passes through them.

    A :class:`~enum.StrEnum`: each member *is* its lower-case string, so the values in
    SQLite, in the JSON of the web page and in ``l3spot jobs`` are the same strings as
    before the enum (no migration), and ``rec.state == "done"`` still holds.
    """

    RECEIVED = "received"  # instances arriving; the series timer runs (node)
    INELIGIBLE = "ineligible"  # stored but not analysed; ``reason`` says why (node)
    QUEUED = "queued"  # the analysis task is sent (node)
    ANALYSING = "analysing"  # a worker runs the pipeline (worker)
    EXPORTING = "exporting"  # results written, delivery to the PACS pending (worker)
    DONE = "done"  # results written (and delivered, if destinations are configured)
    FAILED = "failed"  # analysis or delivery failed; ``reason`` says why

    @property
    def pending(self) -> bool:
        """True while the series still has work to do (re-queued at node start-up)."""
        return self in PENDING_STATES


#: States in which a series still has work to do (re-queued at node start-up).
PENDING_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.ANALYSING, JobState.EXPORTING)

#: States in which a series' (Study, Series) pair is settled: it was queued or analysed. A
#: later instance with the same Series Instance UID under another study is a stray.
OWNING_STATES = frozenset(
    {JobState.QUEUED, JobState.ANALYSING, JobState.EXPORTING, JobState.DONE, JobState.FAILED}
)


class ExportState(StrEnum):
    """The state of one destination's delivery (the ``exports`` table)."""

    PENDING = "pending"  # not tried yet (or reset by a retry)
    RETRYING = "retrying"  # an attempt failed; another is scheduled with back-off
    DONE = "done"  # the PACS accepted every object
    FAILED = "failed"  # ``export.max_attempts`` attempts failed


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    series_uid   TEXT PRIMARY KEY,
    study_uid    TEXT NOT NULL DEFAULT '',
    series_dir   TEXT NOT NULL DEFAULT '',
    state        TEXT NOT NULL,
    reason       TEXT,
    note         TEXT,
    n_instances  INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    token        TEXT,
    received_at  REAL,
    completed_at REAL,
    queued_at    REAL,
    analysis_started_at REAL,
    analysis_finished_at REAL,
    export_finished_at REAL,
    updated_at   REAL NOT NULL,
    requeues     INTEGER NOT NULL DEFAULT 0,
    worker       TEXT,
    run_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS exports (
    series_uid   TEXT NOT NULL,
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_status  TEXT,
    last_error   TEXT,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (series_uid, destination)
);
"""

_TIME_FIELDS = (
    "received_at",
    "completed_at",
    "queued_at",
    "analysis_started_at",
    "analysis_finished_at",
    "export_finished_at",
)


#: Columns added after the first release: ``ALTER TABLE`` on databases that lack them.
_MIGRATIONS = (
    ("requeues", "ALTER TABLE jobs ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0"),
    ("worker", "ALTER TABLE jobs ADD COLUMN worker TEXT"),
    ("run_attempts", "ALTER TABLE jobs ADD COLUMN run_attempts INTEGER NOT NULL DEFAULT 0"),
)


def new_token() -> str:
    """A fresh queue token: Unix time (µs) plus 8 random hex digits, unique per call."""
    return f"{time.time():.6f}-{uuid.uuid4().hex[:8]}"


@dataclass
class ExportRecord:
    """Delivery of one series' results to one destination (``AE@host:port``)."""

    destination: str
    state: ExportState
    attempts: int = 0
    last_status: str | None = None
    last_error: str | None = None
    updated_at: float = 0.0


@dataclass
class DestinationSummary:
    """One destination's deliveries as the job records tell them (``exports`` rows).

    Attributes
    ----------
    destination : ``AE@host:port``.
    last_success_at : Unix time (s) of the newest delivery that reached it, or None.
    last_failure_at : Unix time (s) of the newest failed attempt still on record (a later
        success of the same series clears it), or None.
    last_error : that attempt's reason.
    waiting : series whose delivery to it is not finished (neither ``done`` nor ``failed``).
    failed : series whose delivery to it gave up (``failed``).
    """

    destination: str
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None
    waiting: int = 0
    failed: int = 0


@dataclass
class JobRecord:
    """The state of one series. Times are Unix seconds (float) or ``None``."""

    series_uid: str
    study_uid: str
    series_dir: str
    state: JobState
    reason: str | None = None
    note: str | None = None
    n_instances: int = 0
    attempts: int = 0
    token: str | None = None
    received_at: float | None = None
    completed_at: float | None = None
    queued_at: float | None = None
    analysis_started_at: float | None = None
    analysis_finished_at: float | None = None
    export_finished_at: float | None = None
    updated_at: float = 0.0
    requeues: int = 0
    worker: str | None = None
    #: analysis attempts since the series was last queued by the watcher or an operator
    #: (``attempts`` counts all of them); bounded by ``analysis.max_attempts``
    run_attempts: int = 0
    exports: list[ExportRecord] = field(default_factory=list)

    def timings(self) -> dict[str, float]:
        """Seconds spent per stage (only the stages that have both ends recorded)."""
        spans = {
            "queue_wait_s": (self.queued_at, self.analysis_started_at),
            "analysis_s": (self.analysis_started_at, self.analysis_finished_at),
            "export_s": (self.analysis_finished_at, self.export_finished_at),
            "total_since_complete_s": (self.completed_at, self.export_finished_at),
        }
        return {k: round(b - a, 3) for k, (a, b) in spans.items() if a is not None and b}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for ``l3spot jobs --json``)."""
        d = {k: v for k, v in self.__dict__.items() if k != "exports"}
        d["exports"] = [e.__dict__.copy() for e in self.exports]
        d["timings"] = self.timings()
        return d


def _reset_exports(con: Any, series_uid: str, destinations: list[str], now: float) -> None:
    """Every destination's export row of a series back to ``pending`` (0 attempts)."""
    for dest in destinations:
        con.execute(
            "INSERT INTO exports (series_uid, destination, state, updated_at)"
            " VALUES (?,?,?,?) ON CONFLICT(series_uid, destination) DO UPDATE SET"
            " state=excluded.state, attempts=0, last_status=NULL, last_error=NULL,"
            " updated_at=excluded.updated_at",
            (series_uid, dest, ExportState.PENDING, now),
        )


class JobStore:
    """SQLite job records at ``<spool_dir>/jobs.sqlite``.

    Parameters
    ----------
    spool_dir : the node's spool folder (created if missing).
    busy_timeout_s : seconds a call waits for another connection's write lock before
        raising ``sqlite3.OperationalError`` ("database is locked").

    Notes
    -----
    Each call opens its own short-lived connection, so one store may be shared by threads
    and processes. SQLite locking needs a local file system: several worker *hosts* sharing
    the spool over NFS should use one host for the job database (see docs/deployment.md).
    """

    def __init__(self, spool_dir: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.spool_dir = Path(spool_dir)
        self.busy_timeout_s = busy_timeout_s
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.spool_dir / DB_NAME
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            have = {r["name"] for r in con.execute("PRAGMA table_info(jobs)")}
            for column, ddl in _MIGRATIONS:
                if column not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process won
                        con.execute(ddl)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---- node side -------------------------------------------------------------------

    def mark_received(
        self,
        series_uid: str,
        study_uid: str,
        series_dir: Path,
        received_at: float | None = None,
    ) -> bool:
        """First instance of a series (or of a new burst after it was finished) arrived.

        Parameters
        ----------
        series_uid, study_uid : Series and Study Instance UIDs.
        series_dir : the series folder in the spool.
        received_at : Unix time (s) of that first instance (default: now). The node writes
            this record from its watcher thread, shortly after the instance was stored.

        Returns
        -------
        bool
            False when the Series Instance UID already belongs to another study whose
            series was queued or analysed (:data:`OWNING_STATES`): the record is left as it
            is, and the instances under ``study_uid`` are strays (issue 14, defect 3).

        Raises
        ------
        sqlite3.OperationalError
            The database stayed locked for the whole ``timeout`` (30 s).
        """
        now = time.time() if received_at is None else received_at
        with self._write() as con:
            row = con.execute(
                "SELECT state, study_uid FROM jobs WHERE series_uid=?", (series_uid,)
            ).fetchone()
            if (
                row is not None
                and row["study_uid"]
                and row["study_uid"] != study_uid
                and row["state"] in OWNING_STATES
            ):
                # the Series UID belongs to another study's analysed series: an instance under
                # this study is a stray; the record is not touched (the watcher quarantines it)
                return False
            if row is None:
                con.execute(
                    "INSERT INTO jobs (series_uid, study_uid, series_dir, state, received_at,"
                    " updated_at) VALUES (?,?,?,?,?,?)",
                    (series_uid, study_uid, str(series_dir), JobState.RECEIVED, now, time.time()),
                )
            elif row["state"] != JobState.RECEIVED:
                con.execute(
                    "UPDATE jobs SET state=?, reason=NULL, note=NULL, received_at=?,"
                    " updated_at=? WHERE series_uid=?",
                    (JobState.RECEIVED, now, time.time(), series_uid),
                )
        return True

    def set_study(self, series_uid: str, study_uid: str, series_dir: Path) -> None:
        """The series' Study Instance UID and spool folder, once its identity is settled."""
        self._update(series_uid, study_uid=study_uid, series_dir=str(series_dir))

    def mark_ineligible(self, series_uid: str, reason: str, n_instances: int) -> None:
        """The series is stored but will not be analysed, with the reason."""
        now = time.time()
        self._update(
            series_uid,
            state=JobState.INELIGIBLE,
            reason=reason,
            n_instances=n_instances,
            completed_at=now,
        )

    def mark_queued(self, series_uid: str, n_instances: int | None = None) -> str:
        """Analysis was queued. Returns the new token that the task must present.

        A task whose token differs from the record's is a stale duplicate (e.g. re-queued
        at start-up while the old message survived in Redis) and does nothing.
        ``run_attempts`` restarts at 0: it counts the analysis attempts of this queueing
        (re-deliveries after a worker died, automatic take-overs), which
        ``analysis.max_attempts`` bounds; ``attempts`` keeps counting all of them.
        """
        now = time.time()
        token = new_token()
        fields: dict[str, Any] = {
            "run_attempts": 0,
            "state": JobState.QUEUED,
            "reason": None,
            "note": None,
            "token": token,
            "queued_at": now,
            "analysis_started_at": None,
            "analysis_finished_at": None,
            "export_finished_at": None,
        }
        if n_instances is not None:
            fields["n_instances"] = n_instances
            fields["completed_at"] = now
        self._update(series_uid, **fields)
        return token

    # ---- worker side -----------------------------------------------------------------

    def start_analysis(self, series_uid: str, token: str | None, worker: str | None = None) -> bool:
        """Claim the analysis. False when the task is a stale or repeated delivery.

        Stale: the record carries another token (a newer run superseded this task).
        Repeated: same token but the record already went past ``analysing`` (the broker
        delivered the message again after the work was done, e.g. the worker died between
        finishing and acknowledging). Same token and ``queued``/``analysing`` runs (again):
        that is the re-delivery of a task whose worker died. ``worker`` (``host/pid`` of
        the process running the analysis) is recorded for operators.
        """
        now = time.time()
        with self._write() as con:
            row = con.execute(
                "SELECT token, state FROM jobs WHERE series_uid=?", (series_uid,)
            ).fetchone()
            if (
                row is not None
                and token is not None
                and (
                    row["token"] != token
                    or row["state"] in (JobState.EXPORTING, JobState.DONE, JobState.FAILED)
                )
            ):
                return False
            if row is None:
                con.execute(
                    "INSERT INTO jobs (series_uid, state, updated_at) VALUES (?,?,?)",
                    (series_uid, JobState.ANALYSING, now),
                )
            con.execute(
                "UPDATE jobs SET state=?, attempts=attempts+1, run_attempts=run_attempts+1,"
                " analysis_started_at=?,"
                " reason=NULL, worker=?, updated_at=? WHERE series_uid=?",
                (JobState.ANALYSING, now, worker, now, series_uid),
            )
        return True

    def finish_analysis(
        self, series_uid: str, note: str | None, exporting: bool, token: str | None = None
    ) -> bool:
        """Analysis produced results; ``exporting`` when destinations are configured.

        Returns False (and changes nothing) when ``token`` is given and no longer the
        record's: the series was re-queued meanwhile and the newer run owns the record.
        """
        now = time.time()
        state = JobState.EXPORTING if exporting else JobState.DONE
        with self._write() as con:
            row = con.execute("SELECT token FROM jobs WHERE series_uid=?", (series_uid,)).fetchone()
            if row is not None and token is not None and row["token"] != token:
                return False
            con.execute(
                "UPDATE jobs SET state=?, note=?, analysis_finished_at=?,"
                " export_finished_at=?, updated_at=? WHERE series_uid=?",
                (state, note, now, None if exporting else now, now, series_uid),
            )
        return True

    def heartbeat(self, series_uid: str, token: str | None) -> bool:
        """A running task is alive: bump ``updated_at`` (see :meth:`claim_stale`).

        Returns False when ``token`` is no longer the record's (the task was superseded).
        """
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET updated_at=? WHERE series_uid=? AND (? IS NULL OR token=?)",
                (time.time(), series_uid, token, token),
            )
        return cur.rowcount > 0

    def renew_token(self, series_uid: str) -> str:
        """Give the record a new token (e.g. before re-queueing its export); returns it.

        Any task still carrying the old token becomes a stale duplicate and does nothing.

        Raises
        ------
        JobNotFoundError
            No record for ``series_uid``.
        """
        token = new_token()
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET token=?, updated_at=? WHERE series_uid=?",
                (token, time.time(), series_uid),
            )
        if cur.rowcount == 0:
            raise JobNotFoundError(series_uid)
        return token

    def claim_stale(
        self, queued_before: float, running_before: float, exporting_before: float
    ) -> list[JobRecord]:
        """Atomically take over series whose task was lost (dead worker, restarted broker).

        A series is stale when its record was last updated before the cut-off of its state
        (Unix seconds): ``queued`` before ``queued_before`` (no worker picked it up),
        ``analysing`` before ``running_before`` (its worker stopped sending heartbeats),
        ``exporting`` before ``exporting_before`` (no delivery attempt recorded). Each one
        gets a new token (so a late copy of the old task is a stale duplicate),
        ``requeues`` + 1 and ``updated_at`` = now; ``analysing`` ones go back to ``queued``.
        The caller then sends the task again with the returned records' tokens.

        Returns
        -------
        list[JobRecord]
            The claimed records, as they are after the update.
        """
        now = time.time()
        claimed: list[str] = []
        with self._write() as con:
            rows = con.execute(
                "SELECT series_uid, state FROM jobs WHERE (state=? AND updated_at<?)"
                " OR (state=? AND updated_at<?) OR (state=? AND updated_at<?)",
                (
                    JobState.QUEUED,
                    queued_before,
                    JobState.ANALYSING,
                    running_before,
                    JobState.EXPORTING,
                    exporting_before,
                ),
            ).fetchall()
            for row in rows:
                state = (
                    JobState.EXPORTING if row["state"] == JobState.EXPORTING else JobState.QUEUED
                )
                con.execute(
                    "UPDATE jobs SET state=?, token=?, requeues=requeues+1, updated_at=?"
                    " WHERE series_uid=?",
                    (state, new_token(), now, row["series_uid"]),
                )
                claimed.append(row["series_uid"])
        return [self.get(uid) for uid in claimed]

    def start_export(self, series_uid: str, destinations: list[str]) -> None:
        """(Re)start delivery: state ``exporting``, export rows reset to ``pending``."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "UPDATE jobs SET state=?, reason=NULL, export_finished_at=NULL, updated_at=?"
                " WHERE series_uid=?",
                (JobState.EXPORTING, now, series_uid),
            )
            _reset_exports(con, series_uid, destinations, now)

    def record_export_attempt(
        self,
        series_uid: str,
        destination: str,
        ok: bool,
        status: str | None,
        error: str | None,
        final: bool,
    ) -> int:
        """Record one delivery attempt; returns the attempt count for that destination.

        ``final`` marks the destination ``failed`` (no more retries) when ``ok`` is false.
        """
        now = time.time()
        state = ExportState.DONE if ok else (ExportState.FAILED if final else ExportState.RETRYING)
        with self._write() as con:
            con.execute(
                "INSERT INTO exports (series_uid, destination, state, attempts, last_status,"
                " last_error, updated_at) VALUES (?,?,?,1,?,?,?)"
                " ON CONFLICT(series_uid, destination) DO UPDATE SET state=excluded.state,"
                " attempts=exports.attempts+1, last_status=excluded.last_status,"
                " last_error=excluded.last_error, updated_at=excluded.updated_at",
                (series_uid, destination, state, status, error, now),
            )
            row = con.execute(
                "SELECT attempts FROM exports WHERE series_uid=? AND destination=?",
                (series_uid, destination),
            ).fetchone()
        return int(row["attempts"])

    def start_report_export(self, series_uid: str, destinations: list[str]) -> None:
        """Deliver a failed series' "not measured" report: export rows reset to ``pending``,
        the job stays ``failed`` with its reason (issue 14, defect 7)."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "UPDATE jobs SET export_finished_at=NULL, updated_at=? WHERE series_uid=?",
                (now, series_uid),
            )
            _reset_exports(con, series_uid, destinations, now)

    def finish_report_export(self, series_uid: str) -> None:
        """The "not measured" report reached every destination; the job stays ``failed``."""
        self._update(series_uid, export_finished_at=time.time())

    def finish_export(self, series_uid: str) -> None:
        """Every destination has the results."""
        now = time.time()
        self._update(series_uid, state=JobState.DONE, export_finished_at=now)

    def mark_failed(self, series_uid: str, reason: str) -> None:
        """The series ends failed, with a reason an operator can act on."""
        self._update(series_uid, state=JobState.FAILED, reason=reason)

    # ---- reading ---------------------------------------------------------------------

    def get(self, series_uid: str) -> JobRecord:
        """The record of one series.

        Raises
        ------
        JobNotFoundError
            No record for ``series_uid``.
        """
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE series_uid=?", (series_uid,)).fetchone()
            if row is None:
                raise JobNotFoundError(series_uid)
            exports = con.execute(
                "SELECT * FROM exports WHERE series_uid=? ORDER BY destination", (series_uid,)
            ).fetchall()
        return self._record(row, exports)

    def list(self, states: tuple[JobState, ...] | None = None) -> list[JobRecord]:
        """All records (optionally only those in ``states``), most recently updated first."""
        with self._connect() as con:
            if states:
                marks = ",".join("?" * len(states))
                rows = con.execute(
                    f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY updated_at DESC",
                    states,
                ).fetchall()
            else:
                rows = con.execute("SELECT * FROM jobs ORDER BY updated_at DESC").fetchall()
            exports = con.execute("SELECT * FROM exports ORDER BY destination").fetchall()
        by_series: dict[str, list[sqlite3.Row]] = {}
        for e in exports:
            by_series.setdefault(e["series_uid"], []).append(e)
        return [self._record(r, by_series.get(r["series_uid"], [])) for r in rows]

    def destination_summary(self) -> dict[str, DestinationSummary]:
        """Per destination (``AE@host:port``): last success, last failure, waiting series.

        Read-only; destinations no ``exports`` row names are absent.
        """
        settled = (ExportState.DONE, ExportState.FAILED)
        with self._connect() as con:
            rows = con.execute(
                "SELECT destination,"
                " MAX(CASE WHEN state=? THEN updated_at END) AS last_success_at,"
                " SUM(state NOT IN (?,?)) AS waiting, SUM(state=?) AS failed"
                " FROM exports GROUP BY destination",
                (ExportState.DONE, *settled, ExportState.FAILED),
            ).fetchall()
            errors = con.execute(
                "SELECT destination, last_error, MAX(updated_at) AS at FROM exports"
                " WHERE last_error IS NOT NULL AND state != ? GROUP BY destination",
                (ExportState.DONE,),
            ).fetchall()
        out = {
            r["destination"]: DestinationSummary(
                destination=r["destination"],
                last_success_at=r["last_success_at"],
                waiting=int(r["waiting"] or 0),
                failed=int(r["failed"] or 0),
            )
            for r in rows
        }
        for e in errors:  # SQLite: the bare column comes from the MAX(updated_at) row
            summary = out[e["destination"]]
            summary.last_failure_at, summary.last_error = e["at"], e["last_error"]
        return out

    # ---- helpers ---------------------------------------------------------------------

    def _update(self, series_uid: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._write() as con:
            cur = con.execute(
                f"UPDATE jobs SET {cols} WHERE series_uid=?", (*fields.values(), series_uid)
            )
            if cur.rowcount == 0:
                state = fields.pop("state", JobState.RECEIVED)
                fields.pop("updated_at")
                con.execute(
                    "INSERT INTO jobs (series_uid, state, updated_at) VALUES (?,?,?)",
                    (series_uid, state, time.time()),
                )
                if fields:
                    cols = ", ".join(f"{k}=?" for k in fields)
                    con.execute(
                        f"UPDATE jobs SET {cols} WHERE series_uid=?",
                        (*fields.values(), series_uid),
                    )

    @staticmethod
    def _record(row: sqlite3.Row, exports: list[sqlite3.Row]) -> JobRecord:
        data = {k: row[k] for k in row.keys()}  # noqa: SIM118 (sqlite3.Row)
        data["state"] = JobState(data["state"])
        rec = JobRecord(**data)
        rec.exports = [
            ExportRecord(
                destination=e["destination"],
                state=ExportState(e["state"]),
                attempts=e["attempts"],
                last_status=e["last_status"],
                last_error=e["last_error"],
                updated_at=e["updated_at"],
            )
            for e in exports
        ]
        return rec
