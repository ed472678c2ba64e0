"""Health endpoints: liveness (``/livez``), readiness (``/readyz``) and ``/healthz``.

* **Liveness** answers "should this process be restarted?": the web thread answers (it
  serves the request) and the DICOM SCP's acceptor is serving its socket. Nothing a restart
  cannot fix (a full disk, a broker or a PACS down) makes it fail.
* **Readiness** answers "can the node do its job now?": the SCP, the broker, the workers,
  the spool's free space, and each export destination's C-ECHO (a DICOMweb destination:
  a QIDO-RS request, :func:`core.echo.probe_destination`). Each check answers ``ok``
  true, false, or null (cannot tell from here, e.g. remote workers with the embedded
  broker). A failed SCP/broker/workers/disk check makes it ``fail`` (503). A destination
  that does not answer C-ECHO makes it ``degraded`` but still 200: the node still receives
  and analyses, and the results wait in the export queue until the PACS is back.
  The C-ECHOs run in a background thread and are reused for
  ``web.destination_echo_interval_seconds`` (:class:`DestinationMonitor`), so the endpoint
  answers within :data:`READY_WAIT_S` even when a PACS hangs.
* ``/healthz`` is unchanged from before ``/readyz`` existed (the readiness checks without
  the destinations; 200 or 503), for existing monitors.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from core.config import AnyDestination, Config
from core.echo import (
    EchoOutcome,
    EchoResult,
    check_name,
    connect_address,
    probe_destination,
)

#: Longest wait (s) of ``/readyz`` for destination C-ECHOs under way; later ones show next time.
READY_WAIT_S = 0.5


class NodeProbe(Protocol):
    """What the running node tells the page about itself (see :mod:`service.web.server`)."""

    def scp_listening(self) -> bool:
        """True while the DICOM SCP accepts connections."""
        ...

    def worker_processes(self) -> dict[str, bool] | None:
        """Child worker queue -> alive, or None when the node starts no workers."""
        ...

    def records_health(self) -> tuple[bool, str | None] | None:
        """The series watcher: (no series waits after a failed job-record write or publish,
        the last such failure), or None when unknown (:meth:`SeriesWatcher.health`)."""
        ...


@dataclass
class Check:
    """One health check: ``ok`` true/false/None (unknown) and a short explanation."""

    ok: bool | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def check_node(config: Config, probe: NodeProbe | None) -> Check:
    """The SCP: asked of the node itself, else a TCP connect to ``node.host:node.port``."""
    if probe is not None:
        up = probe.scp_listening()
        return Check(up, "SCP listening" if up else "SCP not listening")
    addr = (connect_address(config.node.host), config.node.port)
    try:
        with socket.create_connection(addr, timeout=1.0):
            return Check(True, f"port {addr[1]} accepts connections")
    except OSError as exc:
        return Check(False, f"cannot connect to {addr[0]}:{addr[1]}: {exc.strerror or exc}")


def check_broker(config: Config) -> Check:
    """Redis answers PING within 1 s, or the embedded broker's queue folder is writable."""
    url = config.broker.url
    if url is None:
        folder = config.broker.resolved_embedded_dir(config.node) / "queue"
        ok = folder.is_dir() and os.access(folder, os.W_OK)
        return Check(ok, f"embedded broker folder {'writable' if ok else 'missing or read-only'}")
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        client.ping()
        return Check(True, "broker answers PING")
    except Exception as exc:  # redis raises several types (connection, auth, timeout)
        return Check(False, f"broker unreachable: {type(exc).__name__}")


def check_workers(config: Config, probe: NodeProbe | None, celery: Any) -> Check:
    """The node's child workers are running; else (Redis) some worker answers a ping."""
    procs = probe.worker_processes() if probe is not None else None
    if procs is not None:
        dead = sorted(q for q, alive in procs.items() if not alive)
        if not procs:
            return Check(False, "no worker processes")
        return Check(not dead, f"dead: {', '.join(dead)}" if dead else f"{len(procs)} running")
    if config.broker.url is not None and celery is not None:
        try:
            replies = celery.control.ping(timeout=1.0)
        except Exception as exc:  # broker down: reported by the broker check too
            return Check(False, f"cannot ping workers: {type(exc).__name__}")
        return Check(bool(replies), f"{len(replies)} worker(s) answered")
    return Check(None, "workers run elsewhere; not visible from here")


def check_disk(config: Config) -> Check:
    """Free space of the spool's file system is at least ``node.min_free_disk_mb``."""
    spool = config.node.spool_dir
    try:
        free_mb = shutil.disk_usage(spool).free / 2**20
    except OSError as exc:
        return Check(False, f"spool not accessible: {exc.strerror or exc}")
    ok = free_mb >= config.node.min_free_disk_mb
    return Check(ok, f"{free_mb:.0f} MB free (minimum {config.node.min_free_disk_mb} MB)")


def check_records(probe: NodeProbe | None) -> Check:
    """Every completed series got its job record and queue message (the disk-full case:
    a series that waits for a failed write is retried by the watcher, and reported here)."""
    report = getattr(probe, "records_health", None)
    state = report() if report is not None else None
    if state is None:
        return Check(None, "series watcher not visible from here")
    ok, last_error = state
    if ok:
        return Check(
            True, "job records written" + (f" (last error: {last_error})" if last_error else "")
        )
    return Check(False, f"series wait for a failed write or publish: {last_error}")


def core_checks(config: Config, probe: NodeProbe | None, celery: Any) -> dict[str, Check]:
    """The checks whose failure stops the node taking in work: node, broker, workers, disk,
    and the job records (:func:`check_records`)."""
    return {
        "node": check_node(config, probe),
        "broker": check_broker(config),
        "workers": check_workers(config, probe, celery),
        "disk": check_disk(config),
        "records": check_records(probe),
    }


def health(config: Config, probe: NodeProbe | None, celery: Any) -> tuple[dict[str, Any], int]:
    """The ``/healthz`` body and HTTP status (200 when no check failed, else 503)."""
    checks = core_checks(config, probe, celery)
    failed = [k for k, c in checks.items() if c.ok is False]
    body = {
        "status": "fail" if failed else "ok",
        "failed": failed,
        "checks": {k: c.as_dict() for k, c in checks.items()},
    }
    return body, 503 if failed else 200


def liveness(config: Config, probe: NodeProbe | None) -> tuple[dict[str, Any], int]:
    """The ``/livez`` body and status: 200 while the SCP serves, else 503.

    Without a probe (the page runs outside ``l3spot serve``) a TCP connect to
    ``node.host:node.port`` stands in for the SCP.
    """
    scp = check_node(config, probe)
    body = {"status": "fail" if scp.ok is False else "ok", "checks": {"scp": scp.as_dict()}}
    return body, 503 if scp.ok is False else 200


#: The function that C-ECHOs (or, DICOMweb, probes) one destination (replaceable in tests).
Echo = Callable[[AnyDestination], EchoResult]


class DestinationMonitor:
    """The latest C-ECHO result of each export destination, refreshed in the background.

    Parameters
    ----------
    config : ``export.destinations``, the calling AE title (:meth:`Config.export_calling_ae_title`)
        and ``web.destination_echo_interval_seconds`` / ``..._timeout_seconds``.
    echo : C-ECHO of one destination (default: :func:`core.echo.probe_destination` with the
        configured timeout: C-ECHO, or QIDO-RS for a DICOMweb destination).
    """

    def __init__(self, config: Config, echo: Echo | None = None) -> None:
        self.destinations = list(config.export.destinations)
        self.interval_s = config.web.destination_echo_interval_seconds
        timeout_s = config.web.destination_echo_timeout_seconds
        calling = config.export_calling_ae_title()
        self.echo: Echo = echo or (lambda d: probe_destination(d, calling, timeout_s))
        self._results: dict[str, EchoResult] = {}
        self._lock = threading.Lock()
        self._refreshing: threading.Thread | None = None

    def latest(self) -> dict[str, EchoResult]:
        """Label -> newest result (destinations never checked are absent)."""
        with self._lock:
            return dict(self._results)

    def check(self, index: int) -> EchoResult:
        """C-ECHO destination ``index`` now (the page's test button); the result is kept.

        Raises
        ------
        IndexError
            No destination with that index.
        """
        dest = self.destinations[index]
        result = self.echo(dest)
        with self._lock:
            self._results[dest.label] = result
        return result

    def _refresh(self) -> None:
        threads = [
            threading.Thread(target=self.check, args=(i,), name="echo-destination", daemon=True)
            for i in range(len(self.destinations))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def snapshot(self, wait_s: float = READY_WAIT_S) -> dict[str, EchoResult]:
        """The results, after starting a refresh when any is older than the interval.

        The call that starts a refresh waits for it at most ``wait_s`` seconds; calls while
        it runs do not wait. A destination that answers later shows its previous result (or
        none) until it does.
        """
        now = time.time()
        started = None
        with self._lock:
            stale = any(
                (r := self._results.get(d.label)) is None or now - r.at >= self.interval_s
                for d in self.destinations
            )
            running = self._refreshing
            if stale and (running is None or not running.is_alive()):
                started = threading.Thread(
                    target=self._refresh, name="echo-destinations", daemon=True
                )
                self._refreshing = started
                started.start()
        if started is not None:
            started.join(wait_s)
        return self.latest()


def check_destinations(
    monitor: DestinationMonitor, wait_s: float = READY_WAIT_S
) -> dict[str, Check]:
    """Label -> check from the destinations' newest C-ECHO (null: not answered yet)."""
    latest = monitor.snapshot(wait_s)
    out: dict[str, Check] = {}
    for dest in monitor.destinations:
        r = latest.get(dest.label)
        if r is None:
            out[dest.label] = Check(None, f"{check_name(dest)} under way")
        else:
            what = (
                str(r.outcome) if r.outcome is EchoOutcome.SUCCESS else f"{r.outcome}: {r.detail}"
            )
            rtt = f" ({r.rtt_ms:.0f} ms)" if r.rtt_ms is not None else ""
            out[dest.label] = Check(r.ok, f"{r.check} {what}{rtt}")
    return out


def readiness(
    config: Config,
    probe: NodeProbe | None,
    celery: Any,
    monitor: DestinationMonitor,
    wait_s: float = READY_WAIT_S,
) -> tuple[dict[str, Any], int]:
    """The ``/readyz`` body and status.

    Returns
    -------
    (body, status): ``status`` "ok" (200), "degraded" (200: a destination does not answer
    C-ECHO; ``degraded`` lists them) or "fail" (503: ``failed`` lists the node, broker,
    workers or disk checks that failed).
    """
    checks = core_checks(config, probe, celery)
    dests = check_destinations(monitor, wait_s)
    failed = [k for k, c in checks.items() if c.ok is False]
    degraded = [k for k, c in dests.items() if c.ok is False]
    body = {
        "status": "fail" if failed else ("degraded" if degraded else "ok"),
        "failed": failed,
        "degraded": degraded,
        "checks": {k: c.as_dict() for k, c in checks.items()},
        "destinations": {k: c.as_dict() for k, c in dests.items()},
    }
    return body, 503 if failed else 200
