"""Job records: one row per series, in SQLite inside the spool folder or in PostgreSQL.

The job record, not Celery's result backend, is the truth about a series: the node writes
``received``/``ineligible``/``queued``, the workers write ``analysing``/``exporting``/``done``/
``failed``. The database survives restarts of the node and of the workers. Two back-ends run
the same SQLAlchemy Core statements (``jobs.database_url``, docs/deployment.md):

- SQLite (the default, ``<spool_dir>/jobs.sqlite``): several processes on *one* host (WAL
  mode, ``BEGIN IMMEDIATE`` writers, a busy timeout);
- PostgreSQL: nodes and workers on several hosts sharing the spool. Each write is one
  transaction (READ COMMITTED) that locks the rows it reads before it changes them
  (``SELECT ... FOR UPDATE``), where SQLite relies on its single writer; a transaction that
  loses a race (unique violation, deadlock, serialization failure) is run again.

It lives in :mod:`core` because both sides write it; :mod:`service.jobs` re-exports it for
the node. The states are :class:`JobState` members (a ``StrEnum``: stored as their strings).
Records hold UIDs, states, reasons and timings only, never patient name, ID or birth date;
the ``measurements`` table names a patient by a keyed hash only (core/followup.py).
Beside the series' records, the ``destinations`` table keeps how each PACS answered lately
(:meth:`JobStore.destination_states`, docs/reliability.md "Export that waits for the PACS").

States (in the order a series passes through them)::

    received -> queued -> analysing -> exporting -> done
           \\-> ineligible (reason)          \\-> failed (reason)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Column,
    Double,
    Integer,
    MetaData,
    Select,
    Table,
    Text,
    case,
    create_engine,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, RowMapping, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.exc import OperationalError as SAOperationalError
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateColumn

from core.errors import ConfigError, JobNotFoundError
from core.followup import MeasurementRow

if TYPE_CHECKING:
    from core.config import Config

_T = TypeVar("_T")

DB_NAME = "jobs.sqlite"
#: Seconds a statement waits for another connection's lock before ``database is locked``.
#: Never wait like this on a thread that owes a DICOM peer a response (the SCP's C-STORE
#: handler): scanners' DIMSE timeouts are typically 30 s too (docs/reliability.md).
BUSY_TIMEOUT_S = 30.0
#: PostgreSQL: times a write transaction runs when it loses a race with another host's
#: (SQLSTATE in :data:`_RETRY_SQLSTATES`); SQLite's writers queue on the busy timeout instead.
PG_TRANSACTION_ATTEMPTS = 5
#: unique_violation (two hosts inserted the same new row), serialization_failure, deadlock
_RETRY_SQLSTATES = frozenset({"23505", "40001", "40P01"})

#: Errors of the job database, whichever the back-end (SQLite's are raised unwrapped, as
#: before PostgreSQL support; PostgreSQL's as SQLAlchemy's ``DBAPIError`` subclasses).
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, DBAPIError)
#: Those that may pass by themselves: a full disk, a lock held too long, a server that
#: restarts or cannot be reached (the node's watcher retries them, service/watcher.py).
TRANSIENT_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.OperationalError,
    SAOperationalError,
)


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
    FAILED = "failed"  # still failing ``export.retry_for_hours`` after the first failure


class DestinationState(StrEnum):
    """How a destination (PACS) answered lately, over all series' attempts.

    An attempt reached it when the association was established and the PACS could store
    (even if it refused one series' objects for their own reasons); a refused connection, a
    failed name lookup, a timeout, a rejected or aborted association, "out of resources" did
    not. See :meth:`JobStore.destination_states`.
    """

    UNKNOWN = "unknown"  # no attempt recorded yet
    OK = "ok"  # the last attempt reached it
    RETRYING = "retrying"  # the last 1 or 2 attempts failed (a restart, a blip)
    DOWN = "down"  # DOWN_AFTER_FAILURES or more attempts in a row failed


#: Failed attempts in a row (by any series) after which a destination is shown ``down``;
#: at the default back-off the third attempt of one series comes 15 s (5 + 10) after its first.
DOWN_AFTER_FAILURES = 3


@dataclass(frozen=True)
class StoreFigures:
    """What ``/metrics`` reports from the job store (:meth:`JobStore.figures`).

    Attributes
    ----------
    states : series per job state.
    stage_seconds : per stage, the seconds each recorded job spent there: ``queue_wait``
        (queued -> analysis started), ``analysis`` (started -> finished), ``export``
        (analysis finished -> export finished, jobs with a delivery only).
    exports : deliveries per (destination, state).
    export_failures : failed delivery attempts per destination (attempts, less the one that
        succeeded for a delivery that is done).
    """

    states: dict[str, int]
    stage_seconds: dict[str, list[float]]
    exports: dict[tuple[str, str], int]
    export_failures: dict[str, int]


metadata = MetaData()

#: One row per series. Times are Unix seconds (DOUBLE PRECISION on PostgreSQL: a REAL there
#: is 4 bytes and would round a timestamp to minutes; SQLite stores either as 8-byte REAL).
jobs_table = Table(
    "jobs",
    metadata,
    Column("series_uid", Text, primary_key=True),
    Column("study_uid", Text, nullable=False, server_default=text("''")),
    Column("series_dir", Text, nullable=False, server_default=text("''")),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("note", Text),
    Column("n_instances", Integer, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("token", Text),
    Column("received_at", Double),
    Column("completed_at", Double),
    Column("queued_at", Double),
    Column("analysis_started_at", Double),
    Column("analysis_finished_at", Double),
    Column("export_finished_at", Double),
    Column("updated_at", Double, nullable=False),
    Column("requeues", Integer, nullable=False, server_default=text("0")),
    Column("worker", Text),
    Column("run_attempts", Integer, nullable=False, server_default=text("0")),
    Column("spool_purged_at", Double),
    Column("results_purged_at", Double),
)
#: One row per (series, destination) delivery.
exports_table = Table(
    "exports",
    metadata,
    Column("series_uid", Text, primary_key=True),
    Column("destination", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_status", Text),
    Column("last_error", Text),
    Column("updated_at", Double, nullable=False),
    Column("first_failure_at", Double),
)
#: How each destination answered lately, over all series.
destinations_table = Table(
    "destinations",
    metadata,
    Column("label", Text, primary_key=True),
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    Column("last_attempt_at", Double),
    Column("last_ok_at", Double),
    Column("last_failure_at", Double),
    Column("last_status", Text),
    Column("last_error", Text),
)
#: One row per measured series, for following a patient over time (issue 17; core/followup.py):
#: the patient as a keyed hash only, the ISO study date, SMA (cm2), SMI (cm2/m2 or NULL).
measurements_table = Table(
    "measurements",
    metadata,
    Column("series_uid", Text, primary_key=True),
    Column("patient_key", Text, nullable=False, index=True),
    Column("study_uid", Text, nullable=False, server_default=text("''")),
    Column("study_date", Text, nullable=False),
    Column("sma_cm2", Double, nullable=False),
    Column("smi_cm2_m2", Double),
    Column("model_version", Text, nullable=False, server_default=text("''")),
    Column("measured_at", Double, nullable=False),
)
#: One row per reader's decision on a result (issue 17, "Review and correct"): ``accept``,
#: ``correct`` (another slice chosen as L3, re-measured by the worker) or ``reject`` (no slice
#: is L3; ``slice_index`` NULL). ``previous_*`` NULL: the result reviewed had no L3 ("not in
#: the field of view"). Slice indices are 0-based in the series sorted by ascending z
#: (``CTVolume.z_mm``), positions in mm.
reviews_table = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_uid", Text, nullable=False, index=True),
    Column("action", Text, nullable=False),
    Column("slice_index", Integer),
    Column("z_mm", Double),
    Column("sop_instance_uid", Text),
    Column("previous_slice_index", Integer),
    Column("previous_z_mm", Double),
    Column("user_name", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("model_version", Text),
)
#: The page's named users (issue 17, docs/web.md "Users and roles"): name, role (``reader`` or
#: ``administrator``) and the password's salted hash (never the password; service/users.py).
#: In the job store so that every host of a site (PostgreSQL) knows the same users.
users_table = Table(
    "users",
    metadata,
    Column("name", Text, primary_key=True),
    Column("role", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
)
#: One row: how many of :data:`_MIGRATIONS` the database has run (absent before this table).
schema_version_table = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

_TIME_FIELDS = (
    "received_at",
    "completed_at",
    "queued_at",
    "analysis_started_at",
    "analysis_finished_at",
    "export_finished_at",
)


#: Columns added after the first release, in order: ``ALTER TABLE ... ADD COLUMN`` (the
#: column as :data:`metadata` declares it) on databases that lack them; a step whose column is
#: None is a new table (``create_all`` made it). The schema's version is the number of these
#: steps it has run; a new step is appended, never inserted.
_MIGRATIONS: tuple[tuple[str, str | None], ...] = (
    ("jobs", "requeues"),
    ("jobs", "worker"),
    ("jobs", "run_attempts"),
    ("jobs", "spool_purged_at"),
    ("jobs", "results_purged_at"),
    ("exports", "first_failure_at"),
    ("measurements", None),
    # a new table: ``metadata.create_all`` makes it; the step moves the version on, so that
    # databases at the previous version run ``create_all`` once
    ("reviews", "id"),
    ("users", None),
)
#: The version of the schema this code writes.
SCHEMA_VERSION = len(_MIGRATIONS)
#: PostgreSQL advisory lock key held while a process creates or migrates the schema.
_SCHEMA_LOCK_KEY = 0x13570318


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
    #: Unix time (s) of the first failed attempt of this delivery (the retry window's start)
    first_failure_at: float | None = None


@dataclass
class DestinationRecord:
    """What the job records know about one destination (``l3spot destinations``).

    Times are Unix seconds or ``None``. ``waiting`` counts the series whose delivery to it
    failed and waits for another attempt (export row ``retrying``); ``failed`` those whose
    delivery to it was given up (until an operator's retry).
    """

    label: str
    state: DestinationState
    consecutive_failures: int = 0
    last_attempt_at: float | None = None
    last_ok_at: float | None = None
    last_failure_at: float | None = None
    last_status: str | None = None
    last_error: str | None = None
    waiting: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for ``l3spot destinations --json`` and the web page)."""
        return dict(self.__dict__)


#: The start of the job record's note while its result is a reader's correction (the worker
#: writes it, the web page reads it; a new analysis clears the note).
CORRECTED_NOTE = "L3 corrected by a reader"
#: The start of the job record's note after a reader rejected the located L3 (the store
#: writes it with the review, :meth:`JobStore.add_review`; an acceptance or a new result
#: replaces it).
REJECTED_NOTE = "L3 rejected by a reader"


class ReviewAction(StrEnum):
    """What a reader decided about a result."""

    ACCEPT = "accept"  # the L3 slice and the numbers are right (or: rightly not found)
    CORRECT = "correct"  # another slice is L3: re-measure there
    REJECT = "reject"  # no slice of this series is L3: the located L3 is wrong


@dataclass(frozen=True)
class ReviewRecord:
    """One reader's decision (a row of ``reviews``). Times are Unix seconds.

    Attributes
    ----------
    id : the review's number (unique in the store; part of the corrected objects' UIDs).
    series_uid : the reviewed CT series.
    action : :class:`ReviewAction`.
    slice_index : the slice the reader chose as L3 (accept: the shown one), 0-based in
        ascending z; None for a reject, or an accept of a result without L3.
    z_mm : that slice's z position (mm).
    sop_instance_uid : that slice's SOP Instance UID.
    previous_slice_index, previous_z_mm : the L3 slice of the result reviewed; None when
        the locator found L3 not in the field of view.
    user_name : who decided (:func:`service.web.auth.signed_in_name`).
    created_at : when.
    model_version : the model version of the result reviewed.
    """

    id: int
    series_uid: str
    action: ReviewAction
    slice_index: int | None
    z_mm: float | None
    sop_instance_uid: str | None
    previous_slice_index: int | None
    previous_z_mm: float | None
    user_name: str
    created_at: float
    model_version: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


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
    #: Unix time (s) at which retention deleted the series' instances from the spool, and
    #: its results folder (``service.retention``); None while they are there
    spool_purged_at: float | None = None
    results_purged_at: float | None = None
    exports: list[ExportRecord] = field(default_factory=list)

    @property
    def purged(self) -> str | None:
        """What retention deleted: ``"spool"``, ``"results"``, ``"spool+results"`` or None."""
        parts = [
            n
            for n, t in (("spool", self.spool_purged_at), ("results", self.results_purged_at))
            if t
        ]
        return "+".join(parts) or None

    @property
    def last_activity(self) -> float:
        """Unix time (s) of the record's latest change or timestamp (retention's age)."""
        times = (
            self.updated_at,
            self.received_at,
            self.completed_at,
            self.queued_at,
            self.analysis_finished_at,
            self.export_finished_at,
        )
        return max(t for t in times if t is not None)

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


# ---- the database ---------------------------------------------------------------------


def postgresql_url(url: str | URL | None, password: str | None = None) -> URL | None:
    """The SQLAlchemy URL of a PostgreSQL job store, or None for SQLite in the spool.

    Parameters
    ----------
    url : ``jobs.database_url``: ``postgresql+psycopg://user@host[:port]/db`` (``postgresql://``
        means the same driver, psycopg 3), or None.
    password : the database password (``jobs.password_env``/``password_file``); replaces any
        password in ``url``.

    Raises
    ------
    ConfigError
        ``url`` is not a PostgreSQL URL SQLAlchemy can parse (the message never repeats it:
        it may hold a password).
    """
    if url is None:
        return None
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError("jobs.database_url: not a database URL") from exc
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() not in (
        "psycopg",
        "psycopg2",  # SQLAlchemy's name when postgresql:// has no driver
    ):
        raise ConfigError("jobs.database_url: must be postgresql+psycopg://user@host/database")
    parsed = parsed.set(drivername="postgresql+psycopg")
    if password is not None:
        parsed = parsed.set(password=password)
    return parsed


def mask_database_url(url: str | URL) -> str:
    """``url`` with its password shown as ``***`` (for logs, the start-up summary, pages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def jobs_database_label(config: Config) -> str:
    """The job store for logs and pages: ``sqlite:<spool>/jobs.sqlite`` or the PostgreSQL
    URL with its password masked (``jobs.database_url`` never carries the one from
    ``password_env``/``password_file``, which is not read here)."""
    if config.jobs.database_url is None:
        return f"sqlite:{(config.node.spool_dir / DB_NAME).resolve()}"
    return mask_database_url(config.jobs.database_url)


_ENGINES: dict[tuple[str, float], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked process (Celery's prefork pool) must not use its parent's pooled sockets:
    forget them without closing them (the parent still uses them), per SQLAlchemy's advice."""
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    for engine in _ENGINES.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _sqlite_engine(path: Path, busy_timeout_s: float) -> Engine:
    """SQLite at ``path``: a new connection per call (NullPool, as before SQLAlchemy), no
    implicit transactions (the store issues ``BEGIN IMMEDIATE`` itself)."""
    engine = create_engine(
        URL.create("sqlite+pysqlite", database=str(path)),
        poolclass=NullPool,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's documented pysqlite recipe

    return engine


def _postgresql_engine(url: URL, busy_timeout_s: float) -> Engine:
    """PostgreSQL: a small pool per process (checked before use: the server may have
    restarted), a row lock waited for at most ``busy_timeout_s`` (like SQLite's busy
    timeout), statement parameters kept out of error messages."""
    return create_engine(
        url,
        pool_size=4,
        max_overflow=8,
        pool_pre_ping=True,
        pool_recycle=3600,
        hide_parameters=True,
        connect_args={
            "connect_timeout": 10,
            "application_name": "l3spot",
            "options": f"-c lock_timeout={int(busy_timeout_s * 1000)}",
        },
    )


def _engine(key: str, busy_timeout_s: float, build: Callable[[], Engine]) -> Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.get((key, busy_timeout_s))
        if engine is None:
            engine = _ENGINES[(key, busy_timeout_s)] = build()
        return engine


def _reset_exports(
    con: Connection, upsert: Any, series_uid: str, destinations: list[str], now: float
) -> None:
    """Every destination's export row of a series back to ``pending`` (0 attempts)."""
    for dest in destinations:
        stmt = upsert(exports_table).values(
            series_uid=series_uid, destination=dest, state=ExportState.PENDING, updated_at=now
        )
        con.execute(
            stmt.on_conflict_do_update(
                index_elements=["series_uid", "destination"],
                set_={
                    "state": stmt.excluded.state,
                    "attempts": 0,
                    "last_status": None,
                    "last_error": None,
                    "first_failure_at": None,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )


_J = jobs_table.c
_E = exports_table.c
_D = destinations_table.c
_M = measurements_table.c
_U = users_table.c


@dataclass(frozen=True)
class UserRow:
    """One named user of the web page as stored: ``role`` is ``reader`` or ``administrator``,
    ``password_hash`` a salted hash (werkzeug's ``scrypt:...`` format); times in Unix s."""

    name: str
    role: str
    password_hash: str
    created_at: float
    updated_at: float


class JobStore:
    """Job records: SQLite at ``<spool_dir>/jobs.sqlite``, or a PostgreSQL database.

    Parameters
    ----------
    spool_dir : the node's spool folder (created if missing; the SQLite file lives there).
    busy_timeout_s : seconds a call waits for another connection's lock: SQLite's write lock
        (then ``sqlite3.OperationalError`` "database is locked"), PostgreSQL's row locks
        (``lock_timeout``; then ``sqlalchemy.exc.OperationalError``).
    database_url : None for SQLite in the spool (the default), or a PostgreSQL URL
        (``postgresql+psycopg://user@host/db``; see :func:`postgresql_url` and
        :meth:`from_config`, which adds the password from the configuration).

    Raises
    ------
    ConfigError
        ``database_url`` is not a PostgreSQL URL.

    Notes
    -----
    Each call runs on its own short-lived connection (SQLite) or one from a small pool
    (PostgreSQL), so one store may be shared by threads and processes. SQLite locking needs
    a local file system: nodes and workers on several *hosts* sharing the spool over NFS use
    PostgreSQL (docs/deployment.md). The schema is created, and migrated
    (:data:`_MIGRATIONS`), by the first store opened on a database.
    """

    def __init__(
        self,
        spool_dir: Path,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        database_url: str | URL | None = None,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        url = postgresql_url(database_url)
        self._pg_url = url
        self.path: Path | None = self.spool_dir / DB_NAME if url is None else None
        self.label = (
            f"sqlite:{self.path}" if url is None else url.render_as_string(hide_password=True)
        )
        self.busy_timeout_s = busy_timeout_s  # builds (or reuses) the engine
        self.sqlite = url is None
        self._upsert = sqlite.insert if self.sqlite else postgresql.insert
        self._ensure_schema()

    @property
    def busy_timeout_s(self) -> float:
        """Seconds a call waits for another connection's lock (SQLite's write lock,
        PostgreSQL's row locks); setting it switches to an engine with that timeout."""
        return self._busy_timeout_s

    @busy_timeout_s.setter
    def busy_timeout_s(self, seconds: float) -> None:
        self._busy_timeout_s = seconds
        if self._pg_url is None:
            path = self.path
            assert path is not None
            self.engine = _engine(
                f"sqlite:{path.resolve()}", seconds, lambda: _sqlite_engine(path, seconds)
            )
        else:
            pg_url = self._pg_url
            self.engine = _engine(
                pg_url.render_as_string(hide_password=False),
                seconds,
                lambda: _postgresql_engine(pg_url, seconds),
            )

    @classmethod
    def from_config(cls, config: Config) -> JobStore:
        """The store ``config`` names: ``jobs.database_url`` (with the password read from
        ``jobs.password_env``/``password_file``), else SQLite in ``node.spool_dir``.

        Raises
        ------
        ConfigError
            The URL is not a PostgreSQL URL, or the password's variable or file is missing.
        """
        url = postgresql_url(config.jobs.database_url, config.jobs.password())
        return cls(config.node.spool_dir, database_url=url)

    # ---- connections and the schema --------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection; SQLite's errors come out as the ``sqlite3`` exceptions they are
        (callers and operators have always seen those), PostgreSQL's as SQLAlchemy's."""
        try:
            with self.engine.connect() as con:
                yield con
        except DBAPIError as exc:
            if self.sqlite and isinstance(exc.orig, sqlite3.Error):
                raise exc.orig from None
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: SQLite takes the database's write lock at once
        (``BEGIN IMMEDIATE``); PostgreSQL begins at the first statement."""
        with self._connect() as con:
            if self.sqlite:
                con.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def _transact(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` in one write transaction; on PostgreSQL, run again (a few times, after a
        short pause) when it lost a race with another connection (:data:`_RETRY_SQLSTATES`)."""
        attempt = 1
        while True:
            try:
                with self._write() as con:
                    return work(con)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate not in _RETRY_SQLSTATES or attempt >= PG_TRANSACTION_ATTEMPTS:
                    raise
            time.sleep(0.01 * attempt)
            attempt += 1

    def _locking(self, stmt: Select[Any], of: Table | None = None) -> Select[Any]:
        """``stmt`` with ``FOR UPDATE [OF of]`` on PostgreSQL: the rows a write transaction
        reads before it changes them are locked (SQLite's ``BEGIN IMMEDIATE`` already holds
        the whole database; SQLite has no ``FOR UPDATE``)."""
        return stmt if self.sqlite else stmt.with_for_update(of=of)

    def _schema_version(self) -> int | None:
        """The database's schema version; None when it has no version table (new, or
        written before the table existed)."""
        try:
            with self.engine.connect() as con:
                return con.execute(select(schema_version_table.c.version)).scalar()
        except DBAPIError:
            return None

    def _ensure_schema(self) -> None:
        """Create the tables and run the missing migrations, once per database: one query
        when the schema is current (every store a task opens), else under the write lock
        (SQLite) or an advisory lock (PostgreSQL) so that processes starting together do
        not race."""
        if self._schema_version() == SCHEMA_VERSION:
            return
        if self.sqlite:
            with self._connect() as con:
                con.exec_driver_sql("PRAGMA journal_mode=WAL")  # not inside a transaction

        def work(con: Connection) -> None:
            if not self.sqlite:
                con.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            metadata.create_all(con, checkfirst=True)
            version = con.execute(select(schema_version_table.c.version)).scalar()
            if version is not None and version >= SCHEMA_VERSION:
                return  # another process migrated it meanwhile (or a newer l3spot did)
            insp = inspect(con)
            for table, column in _MIGRATIONS[version or 0 :]:
                if column is None:
                    continue  # a new table: create_all made it
                if column not in {c["name"] for c in insp.get_columns(table)}:
                    ddl = CreateColumn(metadata.tables[table].c[column]).compile(
                        dialect=con.dialect
                    )
                    con.execute(text(f"ALTER TABLE {table} ADD COLUMN {ddl}"))
                    insp.clear_cache()
            con.execute(schema_version_table.delete())
            con.execute(insert(schema_version_table).values(version=SCHEMA_VERSION))

        self._transact(work)

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

        def work(con: Connection) -> bool:
            row = con.execute(
                self._locking(select(_J.state, _J.study_uid).where(_J.series_uid == series_uid))
            ).first()
            if (
                row is not None
                and row.study_uid
                and row.study_uid != study_uid
                and row.state in OWNING_STATES
            ):
                # the Series UID belongs to another study's analysed series: an instance under
                # this study is a stray; the record is not touched (the watcher quarantines it)
                return False
            if row is None:
                con.execute(
                    insert(jobs_table).values(
                        series_uid=series_uid,
                        study_uid=study_uid,
                        series_dir=str(series_dir),
                        state=JobState.RECEIVED,
                        received_at=now,
                        updated_at=time.time(),
                    )
                )
            elif row.state != JobState.RECEIVED:
                con.execute(
                    update(jobs_table)
                    .where(_J.series_uid == series_uid)
                    .values(
                        state=JobState.RECEIVED,
                        reason=None,
                        note=None,
                        received_at=now,
                        spool_purged_at=None,
                        updated_at=time.time(),
                    )
                )
            return True

        return self._transact(work)

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

        def work(con: Connection) -> bool:
            row = con.execute(
                self._locking(select(_J.token, _J.state).where(_J.series_uid == series_uid))
            ).first()
            if (
                row is not None
                and token is not None
                and (
                    row.token != token
                    or row.state in (JobState.EXPORTING, JobState.DONE, JobState.FAILED)
                )
            ):
                return False
            if row is None:
                con.execute(
                    insert(jobs_table).values(
                        series_uid=series_uid, state=JobState.ANALYSING, updated_at=now
                    )
                )
            con.execute(
                update(jobs_table)
                .where(_J.series_uid == series_uid)
                .values(
                    state=JobState.ANALYSING,
                    attempts=_J.attempts + 1,
                    run_attempts=_J.run_attempts + 1,
                    analysis_started_at=now,
                    reason=None,
                    worker=worker,
                    updated_at=now,
                )
            )
            return True

        return self._transact(work)

    def finish_analysis(
        self, series_uid: str, note: str | None, exporting: bool, token: str | None = None
    ) -> bool:
        """Analysis produced results; ``exporting`` when destinations are configured.

        Returns False (and changes nothing) when ``token`` is given and no longer the
        record's: the series was re-queued meanwhile and the newer run owns the record.
        """
        now = time.time()
        state = JobState.EXPORTING if exporting else JobState.DONE

        def work(con: Connection) -> bool:
            row = con.execute(
                self._locking(select(_J.token).where(_J.series_uid == series_uid))
            ).first()
            if row is not None and token is not None and row.token != token:
                return False
            con.execute(
                update(jobs_table)
                .where(_J.series_uid == series_uid)
                .values(
                    state=state,
                    note=note,
                    analysis_finished_at=now,
                    export_finished_at=None if exporting else now,
                    results_purged_at=None,
                    updated_at=now,
                )
            )
            return True

        return self._transact(work)

    def heartbeat(self, series_uid: str, token: str | None) -> bool:
        """A running task is alive: bump ``updated_at`` (see :meth:`claim_stale`).

        Returns False when ``token`` is no longer the record's (the task was superseded).
        """
        stmt = update(jobs_table).where(_J.series_uid == series_uid)
        if token is not None:
            stmt = stmt.where(_J.token == token)
        return self._transact(
            lambda con: con.execute(stmt.values(updated_at=time.time())).rowcount > 0
        )

    def renew_token(self, series_uid: str) -> str:
        """Give the record a new token (e.g. before re-queueing its export); returns it.

        Any task still carrying the old token becomes a stale duplicate and does nothing.

        Raises
        ------
        JobNotFoundError
            No record for ``series_uid``.
        """
        token = new_token()
        stmt = update(jobs_table).where(_J.series_uid == series_uid)
        changed = self._transact(
            lambda con: con.execute(stmt.values(token=token, updated_at=time.time())).rowcount
        )
        if changed == 0:
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

        On PostgreSQL the stale rows are locked (``FOR UPDATE``) before they change: a
        second host's reconciliation running at the same moment waits, then finds them
        updated (no longer stale) and claims none of them.

        Returns
        -------
        list[JobRecord]
            The claimed records, as they are after the update.
        """
        now = time.time()

        def work(con: Connection) -> list[str]:
            rows = con.execute(
                self._locking(
                    select(_J.series_uid, _J.state).where(
                        or_(
                            (_J.state == JobState.QUEUED) & (_J.updated_at < queued_before),
                            (_J.state == JobState.ANALYSING) & (_J.updated_at < running_before),
                            (_J.state == JobState.EXPORTING) & (_J.updated_at < exporting_before),
                        )
                    )
                )
            ).all()
            claimed: list[str] = []
            for row in rows:
                state = JobState.EXPORTING if row.state == JobState.EXPORTING else JobState.QUEUED
                con.execute(
                    update(jobs_table)
                    .where(_J.series_uid == row.series_uid)
                    .values(
                        state=state,
                        token=new_token(),
                        requeues=_J.requeues + 1,
                        updated_at=now,
                    )
                )
                claimed.append(row.series_uid)
            return claimed

        return [self.get(uid) for uid in self._transact(work)]

    def start_export(self, series_uid: str, destinations: list[str]) -> None:
        """(Re)start delivery: state ``exporting``, export rows reset to ``pending``."""
        now = time.time()

        def work(con: Connection) -> None:
            con.execute(
                update(jobs_table)
                .where(_J.series_uid == series_uid)
                .values(
                    state=JobState.EXPORTING, reason=None, export_finished_at=None, updated_at=now
                )
            )
            _reset_exports(con, self._upsert, series_uid, destinations, now)

        self._transact(work)

    def record_export_attempt(
        self,
        series_uid: str,
        destination: str,
        ok: bool,
        status: str | None,
        error: str | None,
        final: bool,
        now: float | None = None,
    ) -> int:
        """Record one delivery attempt; returns the attempt count for that destination.

        ``final`` marks the destination ``failed`` (no more retries) when ``ok`` is false.
        The first failure of a delivery sets ``first_failure_at`` (the start of the retry
        window). The job record's ``updated_at`` moves too: the node's reconciliation takes
        an ``exporting`` series as lost only when no attempt was recorded for a while.
        ``now`` (Unix s, default the clock) lets tests simulate hours of retries.
        """
        now = time.time() if now is None else now
        state = ExportState.DONE if ok else (ExportState.FAILED if final else ExportState.RETRYING)
        failed_at = None if ok else now

        def work(con: Connection) -> int:
            stmt = self._upsert(exports_table).values(
                series_uid=series_uid,
                destination=destination,
                state=state,
                attempts=1,
                last_status=status,
                last_error=error,
                updated_at=now,
                first_failure_at=failed_at,
            )
            con.execute(
                stmt.on_conflict_do_update(
                    index_elements=["series_uid", "destination"],
                    set_={
                        "state": stmt.excluded.state,
                        "attempts": _E.attempts + 1,
                        "last_status": stmt.excluded.last_status,
                        "last_error": stmt.excluded.last_error,
                        "updated_at": stmt.excluded.updated_at,
                        "first_failure_at": case(
                            (_E.first_failure_at.is_(None), stmt.excluded.first_failure_at),
                            else_=_E.first_failure_at,
                        ),
                    },
                )
            )
            con.execute(
                update(jobs_table)
                .where(_J.series_uid == series_uid)
                .values(updated_at=case((_J.updated_at < now, now), else_=_J.updated_at))
            )
            return int(
                con.execute(
                    select(_E.attempts).where(
                        (_E.series_uid == series_uid) & (_E.destination == destination)
                    )
                ).scalar_one()
            )

        return self._transact(work)

    def record_destination_attempt(
        self,
        label: str,
        reached: bool,
        status: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Record whether an attempt (of any series) reached a destination.

        Parameters
        ----------
        label : the destination's ``AE@host:port``.
        reached : the association was established and the PACS could store (see
            :class:`DestinationState`).
        status, error : the failure's DIMSE status and reason (ignored when reached).
        now : Unix time (s) of the attempt (default: the clock).

        Returns
        -------
        bool
            True when the destination answers again: ``reached`` after one or more failed
            attempts in a row. The caller then resends the series waiting for it
            (:meth:`claim_waiting_exports`).
        """
        now = time.time() if now is None else now

        def work(con: Connection) -> bool:
            # the row exists (export workers on two hosts may record a new one at once),
            # then it is locked: the count read is the one this transaction changes
            con.execute(
                self._upsert(destinations_table)
                .values(label=label)
                .on_conflict_do_nothing(index_elements=["label"])
            )
            before = int(
                con.execute(
                    self._locking(select(_D.consecutive_failures).where(_D.label == label))
                ).scalar_one()
            )
            stmt = update(destinations_table).where(_D.label == label)
            if reached:
                con.execute(
                    stmt.values(consecutive_failures=0, last_attempt_at=now, last_ok_at=now)
                )
            else:
                con.execute(
                    stmt.values(
                        consecutive_failures=_D.consecutive_failures + 1,
                        last_attempt_at=now,
                        last_failure_at=now,
                        last_status=status,
                        last_error=error,
                    )
                )
            return reached and before > 0

        return self._transact(work)

    def claim_waiting_exports(
        self, label: str, exclude: str | None = None
    ) -> list[tuple[str, str]]:
        """Atomically take the series waiting for a retry to ``label``, to send them now.

        Waiting: the series' export row for ``label`` is ``retrying`` and the series is
        ``exporting`` (or ``failed`` with its "not measured" report still being delivered).
        Each gets a new token, so the retry its task holds (a Celery countdown of up to
        ``export.backoff_max_seconds``) finds itself stale and does nothing; the caller
        sends the export again with the returned tokens. On PostgreSQL the job rows are
        locked first (``FOR UPDATE``): two workers that see the destination answer again at
        once do not both claim a series.

        Parameters
        ----------
        label : the destination that answers again.
        exclude : a series not to claim (the one whose attempt just reached it).

        Returns
        -------
        list[tuple[str, str]]
            ``(series_uid, new token)`` of each claimed series.
        """
        now = time.time()

        def work(con: Connection) -> list[tuple[str, str]]:
            rows = con.execute(
                self._locking(
                    select(_J.series_uid)
                    .select_from(jobs_table.join(exports_table, _E.series_uid == _J.series_uid))
                    .where(
                        (_E.destination == label)
                        & (_E.state == ExportState.RETRYING)
                        & or_(
                            _J.state == JobState.EXPORTING,
                            (_J.state == JobState.FAILED) & _J.analysis_finished_at.is_(None),
                        )
                    ),
                    of=jobs_table,
                )
            ).all()
            claimed: list[tuple[str, str]] = []
            for row in rows:
                if row.series_uid == exclude:
                    continue
                token = new_token()
                con.execute(
                    update(jobs_table)
                    .where(_J.series_uid == row.series_uid)
                    .values(token=token, updated_at=now)
                )
                claimed.append((row.series_uid, token))
            return claimed

        return self._transact(work)

    def start_report_export(self, series_uid: str, destinations: list[str]) -> None:
        """Deliver a failed series' "not measured" report: export rows reset to ``pending``,
        the job stays ``failed`` with its reason (issue 14, defect 7)."""
        now = time.time()

        def work(con: Connection) -> None:
            con.execute(
                update(jobs_table)
                .where(_J.series_uid == series_uid)
                .values(export_finished_at=None, updated_at=now)
            )
            _reset_exports(con, self._upsert, series_uid, destinations, now)

        self._transact(work)

    def finish_report_export(self, series_uid: str) -> None:
        """The "not measured" report reached every destination; the job stays ``failed``."""
        self._update(series_uid, export_finished_at=time.time())

    def finish_export(self, series_uid: str) -> None:
        """Every destination has the results."""
        now = time.time()
        self._update(series_uid, state=JobState.DONE, export_finished_at=now)

    def mark_purged(
        self, series_uid: str, spool: bool = False, results: bool = False, at: float | None = None
    ) -> None:
        """Retention deleted the series' spool folder and/or its results folder.

        ``updated_at`` is left as it is: the state did not change, and retention measures
        ages from it (:attr:`JobRecord.last_activity`).

        Parameters
        ----------
        series_uid : Series Instance UID.
        spool, results : which of the two were deleted.
        at : Unix time (s) of the deletion (default: now).
        """
        now = time.time() if at is None else at
        cols = [c for c, on in (("spool_purged_at", spool), ("results_purged_at", results)) if on]
        if not cols:
            return
        stmt = update(jobs_table).where(_J.series_uid == series_uid).values({c: now for c in cols})
        self._transact(lambda con: con.execute(stmt))

    def mark_failed(self, series_uid: str, reason: str) -> None:
        """The series ends failed, with a reason an operator can act on."""
        self._update(series_uid, state=JobState.FAILED, reason=reason)

    # ---- patients followed over time (issue 17) ----------------------------------------

    def record_measurement(self, row: MeasurementRow) -> None:
        """Keep one series' measurement (replacing an earlier one of the same series)."""

        def work(con: Connection) -> None:
            values = dataclasses.asdict(row)
            values["measured_at"] = row.measured_at or time.time()
            stmt = self._upsert(measurements_table).values(values)
            con.execute(
                stmt.on_conflict_do_update(
                    index_elements=["series_uid"],
                    set_={k: stmt.excluded[k] for k in values if k != "series_uid"},
                )
            )

        self._transact(work)

    def previous_measurement(
        self, patient_key: str, before_study_date: str
    ) -> MeasurementRow | None:
        """The patient's latest measurement of a study date strictly before
        ``before_study_date`` (ISO); of several that day, the last measured. None if none."""
        stmt = (
            select(measurements_table)
            .where(_M.patient_key == patient_key, _M.study_date < before_study_date)
            .order_by(_M.study_date.desc(), _M.measured_at.desc())
            .limit(1)
        )
        with self._connect() as con:
            row = con.execute(stmt).first()
        return MeasurementRow(**row._mapping) if row is not None else None

    def measurement(self, series_uid: str) -> MeasurementRow | None:
        """The measurement kept for one series, or None."""
        with self._connect() as con:
            row = con.execute(select(measurements_table).where(_M.series_uid == series_uid)).first()
        return MeasurementRow(**row._mapping) if row is not None else None

    def patient_measurements(self, patient_key: str) -> list[MeasurementRow]:
        """Every measurement of one patient, oldest study first (the trajectory)."""
        stmt = (
            select(measurements_table)
            .where(_M.patient_key == patient_key)
            .order_by(_M.study_date, _M.measured_at)
        )
        with self._connect() as con:
            return [MeasurementRow(**r._mapping) for r in con.execute(stmt)]

    # ---- reviews (issue 17) ----------------------------------------------------------

    def add_review(
        self,
        series_uid: str,
        action: ReviewAction | str,
        user: str,
        *,
        slice_index: int | None = None,
        z_mm: float | None = None,
        sop_instance_uid: str | None = None,
        previous_slice_index: int | None = None,
        previous_z_mm: float | None = None,
        model_version: str | None = None,
        now: float | None = None,
    ) -> ReviewRecord:
        """Record a reader's decision on a series' result.

        Parameters
        ----------
        series_uid : the reviewed series (its job record must exist).
        action : ``accept``, ``correct`` or ``reject``. A reject sets the job's note to
            :data:`REJECTED_NOTE` (with the review id), in the same transaction; an accept
            clears such a note.
        user : who decided.
        slice_index, z_mm, sop_instance_uid : the slice chosen as L3 (index in ascending z,
            position in mm, SOP Instance UID).
        previous_slice_index, previous_z_mm : the L3 slice of the reviewed result.
        model_version : the model version of the reviewed result.
        now : Unix time of the decision (default: now).

        Returns
        -------
        ReviewRecord
            The stored row, with its id.

        Raises
        ------
        JobNotFoundError
            No job record for ``series_uid``.
        ValueError
            ``action`` is not a :class:`ReviewAction`.
        """
        act = ReviewAction(action)
        values = {
            "series_uid": series_uid,
            "action": str(act),
            "slice_index": slice_index,
            "z_mm": z_mm,
            "sop_instance_uid": sop_instance_uid,
            "previous_slice_index": previous_slice_index,
            "previous_z_mm": previous_z_mm,
            "user_name": user,
            "created_at": time.time() if now is None else now,
            "model_version": model_version,
        }

        def work(con: Connection) -> int:
            exists = con.execute(select(_J.series_uid).where(_J.series_uid == series_uid)).first()
            if exists is None:
                raise JobNotFoundError(series_uid)
            rid = int(con.execute(insert(reviews_table).values(values)).inserted_primary_key[0])
            job = update(jobs_table).where(_J.series_uid == series_uid)
            if act == ReviewAction.REJECT:
                note = f"{REJECTED_NOTE} (review {rid}): L3 is not in this series"
                con.execute(job.values(note=note))
            elif act == ReviewAction.ACCEPT:
                con.execute(job.where(_J.note.startswith(REJECTED_NOTE)).values(note=None))
            return rid

        rid = self._transact(work)
        return ReviewRecord(id=rid, **{**values, "action": act})  # type: ignore[arg-type]

    def reviews(self, series_uid: str | None = None) -> list[ReviewRecord]:
        """The reviews of one series (None: of every series), oldest first."""
        stmt = select(reviews_table).order_by(reviews_table.c.id)
        if series_uid is not None:
            stmt = stmt.where(reviews_table.c.series_uid == series_uid)
        with self._connect() as con:
            rows = con.execute(stmt).all()
        return [self._review(r._mapping) for r in rows]

    def review(self, review_id: int) -> ReviewRecord:
        """One review by its id.

        Raises
        ------
        KeyError
            No review ``review_id``.
        """
        with self._connect() as con:
            row = con.execute(select(reviews_table).where(reviews_table.c.id == review_id)).first()
        if row is None:
            raise KeyError(review_id)
        return self._review(row._mapping)

    @staticmethod
    def _review(row: RowMapping) -> ReviewRecord:
        data = {c.name: row[c.name] for c in reviews_table.columns}
        data["action"] = ReviewAction(data["action"])
        return ReviewRecord(**data)

    # ---- the web page's named users (issue 17) ----------------------------------------

    def put_user(self, name: str, role: str, password_hash: str) -> bool:
        """Add user ``name``, or replace the role and password hash of an existing one.

        Returns
        -------
        bool
            True when the user is new, False when an existing one was changed.
        """
        now = time.time()

        def work(con: Connection) -> bool:
            found = con.execute(self._locking(select(_U.name).where(_U.name == name))).first()
            if found is None:
                con.execute(
                    insert(users_table).values(
                        name=name,
                        role=role,
                        password_hash=password_hash,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return True
            con.execute(
                update(users_table)
                .where(_U.name == name)
                .values(role=role, password_hash=password_hash, updated_at=now)
            )
            return False

        return self._transact(work)

    def user(self, name: str) -> UserRow | None:
        """The stored user ``name``, or None."""
        with self._connect() as con:
            row = con.execute(select(users_table).where(_U.name == name)).first()
        return UserRow(**row._mapping) if row is not None else None

    def users(self) -> list[UserRow]:
        """Every stored user, by name."""
        with self._connect() as con:
            rows = con.execute(select(users_table).order_by(_U.name)).all()
        return [UserRow(**r._mapping) for r in rows]

    def remove_user(self, name: str) -> bool:
        """Delete user ``name``; False when there was none."""

        def work(con: Connection) -> bool:
            return bool(con.execute(users_table.delete().where(_U.name == name)).rowcount)

        return self._transact(work)

    # ---- reading ---------------------------------------------------------------------

    def get(self, series_uid: str) -> JobRecord:
        """The record of one series.

        Raises
        ------
        JobNotFoundError
            No record for ``series_uid``.
        """
        with self._connect() as con:
            row = con.execute(select(jobs_table).where(_J.series_uid == series_uid)).first()
            if row is None:
                raise JobNotFoundError(series_uid)
            exports = con.execute(
                select(exports_table).where(_E.series_uid == series_uid).order_by(_E.destination)
            ).all()
        return self._record(row._mapping, [e._mapping for e in exports])

    def list(self, states: tuple[JobState, ...] | None = None) -> list[JobRecord]:
        """All records (optionally only those in ``states``), most recently updated first."""
        stmt = select(jobs_table).order_by(_J.updated_at.desc())
        if states:
            stmt = stmt.where(_J.state.in_([str(s) for s in states]))
        with self._connect() as con:
            rows = con.execute(stmt).all()
            exports = con.execute(select(exports_table).order_by(_E.destination)).all()
        by_series: dict[str, list[RowMapping]] = {}
        for e in exports:
            by_series.setdefault(e.series_uid, []).append(e._mapping)
        return [self._record(r._mapping, by_series.get(r.series_uid, [])) for r in rows]

    def figures(self) -> StoreFigures:
        """Counts and stage durations for ``/metrics``, in SQL that SQLite and PostgreSQL
        both run (the store's own engine: the same figures whichever holds the jobs)."""
        stages = {
            "queue_wait": (_J.queued_at, _J.analysis_started_at, False),
            "analysis": (_J.analysis_started_at, _J.analysis_finished_at, False),
            "export": (_J.analysis_finished_at, _J.export_finished_at, True),
        }
        with self._connect() as con:
            states = {
                str(r.state): int(r.n)
                for r in con.execute(select(_J.state, func.count().label("n")).group_by(_J.state))
            }
            seconds: dict[str, list[float]] = {}
            for name, (start, end, delivered) in stages.items():
                stmt = select((end - start).label("d")).where(start.is_not(None), end.is_not(None))
                if delivered:
                    stmt = stmt.where(exists().where(_E.series_uid == _J.series_uid))
                seconds[name] = [max(float(r.d), 0.0) for r in con.execute(stmt)]
            exports = {
                (str(r.destination), str(r.state)): int(r.n)
                for r in con.execute(
                    select(_E.destination, _E.state, func.count().label("n")).group_by(
                        _E.destination, _E.state
                    )
                )
            }
            done = case((_E.state == str(ExportState.DONE), 1), else_=0)
            failures = {
                str(r.destination): max(int(r.failed or 0), 0)
                for r in con.execute(
                    select(_E.destination, func.sum(_E.attempts - done).label("failed")).group_by(
                        _E.destination
                    )
                )
            }
        return StoreFigures(states, seconds, exports, failures)

    def destination_states(self, labels: list[str] | None = None) -> list[DestinationRecord]:
        """One record per destination: its state, last contact, last error, series waiting.

        The single source of the destinations' state (``l3spot destinations``, the web
        page). Parameters: ``labels``, the configured destinations' ``AE@host:port``: each is
        listed (``unknown`` when never tried), in that order, followed by any other
        destination the records know of (e.g. removed from the configuration since).
        """
        from sqlalchemy import func

        with self._connect() as con:
            rows = {r.label: r._mapping for r in con.execute(select(destinations_table))}
            counts: dict[str, dict[str, int]] = {}
            for r in con.execute(
                select(_E.destination, _E.state, func.count().label("n"))
                .where(_E.state.in_([str(ExportState.RETRYING), str(ExportState.FAILED)]))
                .group_by(_E.destination, _E.state)
            ):
                counts.setdefault(r.destination, {})[r.state] = int(r.n)
        order = list(dict.fromkeys([*(labels or []), *sorted(rows), *sorted(counts)]))
        out = []
        for label in order:
            row = rows.get(label)
            n = counts.get(label, {})
            fails = int(row["consecutive_failures"]) if row is not None else 0
            if row is None or row["last_attempt_at"] is None:
                state = DestinationState.UNKNOWN
            elif fails == 0:
                state = DestinationState.OK
            elif fails < DOWN_AFTER_FAILURES:
                state = DestinationState.RETRYING
            else:
                state = DestinationState.DOWN
            rec = DestinationRecord(
                label=label,
                state=state,
                waiting=n.get(ExportState.RETRYING, 0),
                failed=n.get(ExportState.FAILED, 0),
            )
            if row is not None:
                rec.consecutive_failures = fails
                rec.last_attempt_at = row["last_attempt_at"]
                rec.last_ok_at = row["last_ok_at"]
                rec.last_failure_at = row["last_failure_at"]
                rec.last_status = row["last_status"]
                rec.last_error = row["last_error"]
            out.append(rec)
        return out

    # ---- helpers ---------------------------------------------------------------------

    def _update(self, series_uid: str, **fields: Any) -> None:
        """Set ``fields`` (and ``updated_at``) of a record, creating it when missing."""

        def work(con: Connection) -> None:
            values = {**fields, "updated_at": time.time()}
            cur = con.execute(update(jobs_table).where(_J.series_uid == series_uid).values(values))
            if cur.rowcount == 0:
                rest = dict(fields)
                state = rest.pop("state", JobState.RECEIVED)
                con.execute(
                    insert(jobs_table).values(
                        series_uid=series_uid, state=state, updated_at=time.time()
                    )
                )
                if rest:
                    con.execute(update(jobs_table).where(_J.series_uid == series_uid).values(rest))

        self._transact(work)

    @staticmethod
    def _record(row: RowMapping, exports: list[RowMapping]) -> JobRecord:
        data = {c.name: row[c.name] for c in jobs_table.columns}
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
                first_failure_at=e["first_failure_at"],
            )
            for e in exports
        ]
        return rec
