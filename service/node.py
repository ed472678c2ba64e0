"""The node: SCP + spool + series watcher + job records + enqueueing (+ embedded workers).

``l3spot serve`` builds one :class:`Node`. With the embedded broker (``broker.url: null``)
it also starts its workers as child processes (``l3spot worker``), one for the
``analysis`` queue and one for ``export``, and restarts them if they die, so a crash in the
analysis never takes the SCP down and a slow PACS never blocks the analysis. The children
get ``SIGTERM`` when the node dies, even by ``SIGKILL`` (Linux ``PR_SET_PDEATHSIG``), so a
restarted node never finds orphan workers of its predecessor.

The spool and the job records are the truth, not the broker: a reconciliation thread
(:meth:`Node.reconcile`) queues again every series whose task was lost (a worker killed
with its message, a Redis restarted without persistence).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import Config
from core.errors import StartupError
from core.jobs import DATABASE_ERRORS, JobRecord, JobState, JobStore, jobs_database_label
from core.logs import log_event
from core.queue import ANALYSIS_QUEUE, EXPORT_QUEUE, configure_app, send_analysis, send_export
from service.audit import AuditLog, audit_log_path
from service.retention import RetentionThread, start_retention
from service.scp import start_scp
from service.spool import Spool
from service.startup import listen_error, log_node_started
from service.watcher import SeriesWatcher

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (no-op elsewhere)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class BackgroundCalls:
    """Runs calls one after another on a daemon thread, so the caller never waits for them.

    For bookkeeping that must stay off the SCP's association threads (the C-STORE handler
    owes the scanner a response; DESIGN.md: keep it short), such as the web page's SQLite
    record of which AE title sent a series. A call that raises is logged and dropped.

    Parameters
    ----------
    name : the thread's name.
    max_pending : calls queued at most; beyond that new calls are dropped (and logged), so
        a stuck database cannot make the node's memory grow.
    """

    def __init__(self, name: str, max_pending: int = 10_000) -> None:
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue(
            max_pending
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; returns at once."""
        try:
            self._queue.put_nowait((fn, args))
        except queue.Full:
            log_event(log, "background_call_dropped", logging.WARNING, call=repr(fn)[:80])

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., None]:
        """``fn`` made asynchronous: each call is queued with :meth:`submit`."""

        def deferred(*args: Any) -> None:
            self.submit(fn, *args)

        return deferred

    def join(self, timeout_s: float = 10.0) -> None:
        """Run what is queued, then stop the thread (waits at most ``timeout_s``)."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except Exception:  # bookkeeping only: never stop the thread
                log.exception("background_call_failed")


class WorkerSupervisor:
    """Child ``l3spot worker`` processes, restarted when they exit unexpectedly.

    Parameters
    ----------
    config_path : passed on as ``--config`` (the children also inherit the environment,
        so ``L3SPOT__...`` overrides apply to them too).
    queues : one child per entry, e.g. ``["analysis", "export"]``.
    """

    def __init__(self, config_path: Path | None, queues: list[str], concurrency: int) -> None:
        self.config_path = config_path
        self.queues = queues
        self.concurrency = concurrency
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _command(self, queue: str) -> list[str]:
        cmd = [sys.executable, "-m", "l3spot", "worker", "--queues", queue]
        cmd += ["--concurrency", str(self.concurrency if queue == ANALYSIS_QUEUE else 1)]
        cmd += ["--hostname", f"{queue}-{os.getpid()}@%h"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _spawn(self, queue: str) -> None:
        # PR_SET_PDEATHSIG is tied to the thread that forks: children are spawned from the
        # main thread (start) or the supervisor thread, both alive as long as the node
        self.procs[queue] = subprocess.Popen(self._command(queue), preexec_fn=_die_with_parent)
        log_event(log, "worker_started", queue=queue, pid=self.procs[queue].pid)

    def start(self) -> None:
        """Start the children and a thread that restarts them."""
        for q in self.queues:
            self._spawn(q)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for q, p in list(self.procs.items()):
                if p.poll() is not None and not self._stop.is_set():
                    log_event(log, "worker_exited", logging.WARNING, queue=q, rc=p.returncode)
                    self._spawn(q)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the children (Celery warm shutdown), SIGKILL what is left after timeout."""
        self._stop.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Node:
    """Everything ``l3spot serve`` runs.

    Parameters
    ----------
    config : the configuration.
    config_path : the file it came from (handed to child workers), or None.
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        node = config.node
        self.config = config
        self.config_path = config_path
        self.spool = Spool(node.spool_dir, node.resolved_quarantine_dir(), fsync=node.fsync)
        try:
            self.jobs = JobStore.from_config(config)
        except DATABASE_ERRORS as exc:  # PostgreSQL unreachable, SQLite file unusable
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise StartupError(
                f"jobs.database_url {jobs_database_label(config)}: cannot open: {reason}"
            ) from exc
        self.app = configure_app(config)
        self.watcher = SeriesWatcher(
            node, self.jobs, self.enqueue_analysis, audit=AuditLog(audit_log_path(config))
        )
        self.supervisor: WorkerSupervisor | None = None
        self.ae = None
        self.server = None
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self._web_records: BackgroundCalls | None = None
        self.retention: RetentionThread | None = None

    def enqueue_analysis(self, series_dir: Path, series_uid: str, token: str | None) -> None:
        """Send ``worker.tasks.analyze_series(series_dir, token=...)`` to queue ``analysis``."""
        send_analysis(self.app, series_dir, token)

    def enqueue_export(self, series_uid: str, token: str | None) -> None:
        """Send ``worker.tasks.export_results(series_uid, token=...)`` to queue ``export``."""
        send_export(self.app, series_uid, token)

    def reconcile(self, now: float | None = None) -> list[JobRecord]:
        """Queue again every series whose task was lost; returns their (updated) records.

        Lost means the job record did not move for longer than ``broker.stale_queued_seconds``
        (``queued``: no worker picked the message up, e.g. Redis restarted empty),
        ``broker.stale_running_seconds`` (``analysing``: no heartbeat, the worker died) or
        that plus ``export.backoff_max_seconds + export.timeout_seconds`` (``exporting``).
        :meth:`core.jobs.JobStore.claim_stale` gives each a new token atomically, so the
        old message, should it still be delivered, does nothing. A failed publish (broker
        down) is logged; the series is claimed again after the same delay.

        Parameters
        ----------
        now : Unix time (s) of the check (default: now).
        """
        now = time.time() if now is None else now
        b, e = self.config.broker, self.config.export
        claimed = self.jobs.claim_stale(
            queued_before=now - b.stale_queued_seconds,
            running_before=now - b.stale_running_seconds,
            exporting_before=now
            - b.stale_running_seconds
            - e.backoff_max_seconds
            - e.timeout_seconds,
        )
        for rec in claimed:
            try:
                if rec.state == JobState.EXPORTING:
                    self.enqueue_export(rec.series_uid, rec.token)
                else:
                    series_dir = self.spool.series_path(rec.series_uid, rec.series_dir)
                    if series_dir is None:
                        self.jobs.mark_failed(rec.series_uid, "series not in the spool")
                        continue
                    self.enqueue_analysis(series_dir, rec.series_uid, rec.token)
            except Exception as exc:  # broker down: try again after the stale delay
                log_event(
                    log,
                    "requeue_failed",
                    logging.WARNING,
                    series_instance_uid=rec.series_uid,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            log_event(
                log,
                "series_requeued",
                logging.WARNING,
                series_instance_uid=rec.series_uid,
                state=rec.state,
                requeues=rec.requeues,
            )
        # ``received`` series that no watcher entry holds any more (issue 16, disk full)
        self.watcher.adopt_orphans(now)
        return claimed

    def _reconcile_loop(self) -> None:
        interval = self.config.broker.reconcile_interval_seconds
        while not self._stop.wait(interval):
            try:
                self.reconcile()
            except Exception:  # keep the thread alive (database locked, ...)
                log.exception("reconcile_failed")

    def start(self) -> None:
        """Start workers (embedded broker), re-queue pending series, then listen."""
        from service.web.server import start_web  # operators' page (issue 8); None if disabled

        try:  # first: an unprotected non-loopback page stops the start
            self.web = start_web(self)
        except OSError as exc:
            web = self.config.web
            raise listen_error("web.host, web.port", web.host, web.port, exc) from exc
        own_workers = self.config.broker.starts_workers()
        if own_workers:
            self.supervisor = WorkerSupervisor(
                self.config_path,
                [ANALYSIS_QUEUE, EXPORT_QUEUE],
                self.config.broker.worker_concurrency,
            )
            self.supervisor.start()
        # the node's own workers died with its predecessor: their series are re-queued now;
        # separate workers may still run theirs: the reconciliation handles the lost ones
        self.watcher.recover(self.spool, self.enqueue_export, requeue_running=own_workers)
        self.watcher.start()
        # retention.interval_minutes: old, finished, exported series leave spool and results
        self.retention = start_retention(
            self.config, self.jobs, self.spool, self.watcher.audit, self.watcher.busy_series
        )
        if self.config.broker.reconcile_interval_seconds > 0:
            self._stop.clear()
            self._reconciler = threading.Thread(
                target=self._reconcile_loop, name="reconciler", daemon=True
            )
            self._reconciler.start()
        # on_stored runs inside the C-STORE handler: memory only (the watcher writes the job
        # records from its own thread; the web page's sender record from another one)
        on_stored = self.watcher.touch
        if self.web:
            record_sender = self.web.observer.record_sender
            if record_sender is not None:
                self._web_records = BackgroundCalls("web-records")
                self.web.observer.record_sender = self._web_records.wrap(record_sender)
            on_stored = self.web.observe(self.watcher.touch)
        try:
            self.ae, self.server = start_scp(self.config, self.spool, on_stored)
        except OSError as exc:
            node = self.config.node
            raise listen_error("node.host, node.port", node.host, node.port, exc) from exc
        except ValueError as exc:  # TLS files missing, an allowed address that is no IP/CIDR
            raise StartupError(str(exc)) from exc
        self.watcher.on_stable = self.server.store_handler.forget_series
        if self.web:
            self.web.observer.bind(self.server)
        web_url = f"http://{self.config.web.host}:{self.web.port}" if self.web else None
        log_node_started(self.config, self.config_path, self.server.server_address[1], web_url)

    def stop(self) -> None:
        """Stop listening, stop the watcher and the reconciliation, stop the child workers."""
        if self.ae is not None:
            self.ae.shutdown()
        if getattr(self, "web", None) is not None:
            self.web.stop()
        if self._web_records is not None:
            self._web_records.join()
        self._stop.set()
        if self.retention is not None:
            self.retention.stop()
        if self._reconciler is not None:
            self._reconciler.join(timeout=10)
        self.watcher.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        log_event(log, "node_stopped")

    def serve_forever(self) -> None:
        """:meth:`start`, then block until SIGTERM or SIGINT, then :meth:`stop`."""
        done = threading.Event()

        def _signal(signum: int, frame: object) -> None:
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        try:
            self.start()
        except BaseException:  # a port in use: stop the workers and threads already started
            self.stop()
            raise
        try:
            done.wait()
        finally:
            self.stop()
