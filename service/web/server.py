"""Serving the web application inside ``l3spot serve`` (waitress, in a background thread).

The node calls :func:`start_web` once from :meth:`service.node.Node.start`; it returns None
unless ``web.enabled``. The returned :class:`WebServer` also carries the SCP observer
(:class:`service.metrics.ScpObserver`) that counts instances and notes each series' calling
AE title for the page's filter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.config import Config
from core.logs import log_event
from service.metrics import ScpObserver
from service.web.app import create_app
from service.web.sources import SeriesSources

log = logging.getLogger(__name__)

#: waitress worker threads: a handful of operators and one Prometheus scraper.
WEB_THREADS = 4


class _NodeProbe:
    """:class:`service.web.health.NodeProbe` reading a live :class:`service.node.Node`."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def scp_listening(self) -> bool:
        """The SCP's socket is open and its acceptor thread runs ``serve_forever``."""
        server = getattr(self.node, "server", None)
        sock = getattr(server, "socket", None)
        if sock is None or sock.fileno() < 0:
            return False
        # socketserver.BaseServer clears this event while serve_forever runs (stdlib since
        # Python 2.6); absent on another server class: the open socket decides
        stopped = getattr(server, "_BaseServer__is_shut_down", None)
        return not (isinstance(stopped, threading.Event) and stopped.is_set())

    def records_health(self) -> tuple[bool, str | None] | None:
        watcher = getattr(self.node, "watcher", None)
        if watcher is None:
            return None
        state = watcher.health()
        return state.ok, state.last_error

    def worker_processes(self) -> dict[str, bool] | None:
        supervisor = getattr(self.node, "supervisor", None)
        if supervisor is None:
            return None
        return {q: p.poll() is None for q, p in supervisor.procs.items()}


class WebServer:
    """The page on ``web.host:web.port``, served by waitress from a daemon thread.

    Parameters
    ----------
    config : the node's configuration.
    node : the running :class:`service.node.Node` (for ``/healthz`` and retries), or None.

    Raises
    ------
    service.web.app.WebConfigError
        Unprotected on a non-loopback address (checked here, before anything listens).
    """

    def __init__(self, config: Config, node: Any | None = None) -> None:
        self.config = config
        self.observer = ScpObserver(SeriesSources(config.node.spool_dir).record_sender)
        probe = _NodeProbe(node) if node is not None else None
        self.app = create_app(config, probe=probe, celery=getattr(node, "app", None))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def observe(self, on_stored: Callable[[str, str, Path], None]) -> Callable[..., None]:
        """The SCP's ``on_stored`` callback, counted (see :class:`ScpObserver`)."""
        return self.observer.wrap_on_stored(on_stored)

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``web.port: 0``)."""
        return int(self._server.effective_port) if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises
        ------
        OSError
            The port cannot be bound.
        """
        from waitress.server import create_server

        web = self.config.web
        self._server = create_server(
            self.app, host=web.host, port=web.port, threads=WEB_THREADS, ident="l3spot"
        )
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)
        self._thread.start()
        log_event(log, "web_listening", host=web.host, port=self.port)

    def _serve(self) -> None:
        try:
            self._server.run()
        except OSError:
            # stop() closes the sockets under waitress's select(): EBADF is the way out.
            if not self._stopping.is_set():
                raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listening socket and open connections; wait for the thread."""
        if self._server is None:
            return
        from waitress import wasyncore

        self._stopping.set()
        self._server.task_dispatcher.shutdown()
        wasyncore.close_all(self._server._map)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server = None


def start_web(node: Any) -> WebServer | None:
    """Start the page for a :class:`service.node.Node` when ``web.enabled``; else None."""
    if not node.config.web.enabled:
        return None
    server = WebServer(node.config, node)
    server.start()
    return server
