"""``/healthz``: is the node listening, the broker reachable, a worker alive, the disk roomy?

Each check answers ``ok`` true, false, or null (cannot tell from here, e.g. remote workers
with the embedded broker); the endpoint answers 503 when any check is false.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from core.config import Config


class NodeProbe(Protocol):
    """What the running node tells the page about itself (see :mod:`service.web.server`)."""

    def scp_listening(self) -> bool:
        """True while the DICOM SCP accepts connections."""
        ...

    def worker_processes(self) -> dict[str, bool] | None:
        """Child worker queue -> alive, or None when the node starts no workers."""
        ...


@dataclass
class Check:
    """One health check: ``ok`` true/false/None (unknown) and a short explanation."""

    ok: bool | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def check_node(config: Config, probe: NodeProbe | None) -> Check:
    """The SCP: asked of the node itself, else a TCP connect to ``node.host:node.port``."""
    if probe is not None:
        up = probe.scp_listening()
        return Check(up, "SCP listening" if up else "SCP not listening")
    addr = (_connect_host(config.node.host), config.node.port)
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


def health(config: Config, probe: NodeProbe | None, celery: Any) -> tuple[dict[str, Any], int]:
    """The ``/healthz`` body and HTTP status (200 when no check failed, else 503)."""
    checks = {
        "node": check_node(config, probe),
        "broker": check_broker(config),
        "workers": check_workers(config, probe, celery),
        "disk": check_disk(config),
    }
    failed = [k for k, c in checks.items() if c.ok is False]
    body = {
        "status": "fail" if failed else "ok",
        "failed": failed,
        "checks": {k: c.as_dict() for k, c in checks.items()},
    }
    return body, 503 if failed else 200
