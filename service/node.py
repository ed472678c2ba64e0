"""The node: SCP + spool + series watcher + job records + enqueueing (+ embedded workers).

``l3spot serve`` builds one :class:`Node`. With the embedded broker (``broker.url: null``)
it also starts its workers as child processes (``l3spot worker``), one for the
``analysis`` queue and one for ``export``, and restarts them if they die, so a crash in the
analysis never takes the SCP down and a slow PACS never blocks the analysis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from service.scp import start_scp
from service.spool import Spool
from service.watcher import SeriesWatcher
from worker.celery_app import (
    ANALYSIS_QUEUE,
    ANALYZE_TASK,
    EXPORT_QUEUE,
    EXPORT_TASK,
    configure_app,
)
from worker.config import Config
from worker.jobstore import JobStore
from worker.logs import log_event

log = logging.getLogger(__name__)


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
        cmd = [sys.executable, "-m", "service.cli", "worker", "--queues", queue]
        cmd += ["--concurrency", str(self.concurrency if queue == ANALYSIS_QUEUE else 1)]
        cmd += ["--hostname", f"{queue}-{os.getpid()}@%h"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _spawn(self, queue: str) -> None:
        self.procs[queue] = subprocess.Popen(self._command(queue))
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
        self.jobs = JobStore(node.spool_dir)
        self.app = configure_app(config)
        self.watcher = SeriesWatcher(node, self.jobs, self.enqueue_analysis)
        self.supervisor: WorkerSupervisor | None = None
        self.ae = None
        self.server = None

    def enqueue_analysis(self, series_dir: Path, series_uid: str, token: str | None) -> None:
        """Send ``worker.tasks.analyze_series(series_dir, token=...)`` to queue ``analysis``."""
        self.app.send_task(
            ANALYZE_TASK,
            args=[str(Path(series_dir).resolve())],
            kwargs={"token": token},
            queue=ANALYSIS_QUEUE,
        )

    def enqueue_export(self, series_uid: str, token: str | None) -> None:
        """Send ``worker.tasks.export_results(series_uid, token=...)`` to queue ``export``."""
        self.app.send_task(
            EXPORT_TASK, args=[series_uid], kwargs={"token": token}, queue=EXPORT_QUEUE
        )

    def start(self) -> None:
        """Start workers (embedded broker), re-queue pending series, then listen."""
        if self.config.broker.starts_workers():
            self.supervisor = WorkerSupervisor(
                self.config_path,
                [ANALYSIS_QUEUE, EXPORT_QUEUE],
                self.config.broker.worker_concurrency,
            )
            self.supervisor.start()
        self.watcher.recover(self.spool, self.enqueue_export)
        self.watcher.start()
        self.ae, self.server = start_scp(self.config, self.spool, self.watcher.touch)

    def stop(self) -> None:
        """Stop listening, stop the watcher, stop the child workers."""
        if self.ae is not None:
            self.ae.shutdown()
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
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
