"""Celery's output as l3spot log lines: JSON on stdout, no banner, no plain-text lines.

A Celery worker writes in three ways besides l3spot's own log calls, and each is routed:

* its loggers (``celery.*``, ``kombu.*``, the pool's ``multiprocessing`` logger): Celery
  configures its own handlers and formats unless a receiver of the
  ``celery.signals.setup_logging`` signal exists; :func:`route_celery_output` connects one
  that calls :func:`core.logs.setup_logging` (in the worker's main process and again in
  each prefork pool child) and lets the ``multiprocessing`` logger propagate to the root
  (WARNING and above);
* its start banner: switched off with the ``--quiet`` option (:data:`CELERY_QUIET`);
* a few lines its signal handlers write straight to the stdout file descriptor with
  ``celery.apps.worker.safe_say`` ("worker: Warm shutdown (MainProcess)"): that one function
  is replaced by :func:`_say_as_log_line`, which writes the same text as one log line, with
  :func:`os.write` and no logging lock (it runs inside a signal handler).

Python warnings (Celery's ``SecurityWarning`` when run as root, ...) are logged by
:func:`core.logs.setup_logging`.

The replacement of ``safe_say`` is the one patch of Celery's internals;
``tests/unit/test_logs.py`` fails when it no longer attaches (the function gone, or no
longer what the shutdown handler calls), and ``tests/integration/test_logs_cli.py`` checks
the whole stdout of a worker that starts and stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from core.logs import setup_logging

#: Celery's global option that suppresses the start banner.
CELERY_QUIET = "--quiet"

#: Logger name of the lines Celery's signal handlers print.
SAY_LOGGER = "celery.apps.worker"

_routed: dict[str, Any] = {}


def _setup_logging_receiver(**_: Any) -> None:
    """``celery.signals.setup_logging`` receiver: l3spot's handler instead of Celery's."""
    from celery.utils.log import get_multiprocessing_logger

    setup_logging(_routed["level"], _routed["json_logs"])
    # billiard's logger has no handler and does not propagate; at INFO it tells of every
    # mmap and child start: its warnings and errors only (a pool child killed, ...), as Celery
    mp_logger = get_multiprocessing_logger()
    mp_logger.propagate = True
    mp_logger.setLevel(logging.WARNING)


def _say_as_log_line(msg: str, f: Any = None) -> None:
    """``safe_say`` replacement: ``msg`` as one log line on stdout, written with os.write.

    Formats with the root handler's formatter (JSON or plain, as configured); takes no
    logging lock, so it is safe in a signal handler.
    """
    handlers = logging.getLogger().handlers
    formatter = handlers[0].formatter if handlers and handlers[0].formatter else None
    record = logging.LogRecord(SAY_LOGGER, logging.INFO, __file__, 0, msg.strip(), None, None)
    line = formatter.format(record) if formatter is not None else record.getMessage()
    with contextlib.suppress(OSError, ValueError):  # stdout closed: nothing to say it on
        os.write(sys.__stdout__.fileno() if sys.__stdout__ else 1, (line + "\n").encode())


def route_celery_output(level: str, json_logs: bool) -> None:
    """Make a Celery worker of this process log as l3spot does (see the module docstring).

    Call before ``app.worker_main``, and add :data:`CELERY_QUIET` before ``worker`` in its
    arguments.

    Parameters
    ----------
    level : root log level name.
    json_logs : JSON lines (True) or plain text.
    """
    import celery.apps.worker
    from celery import signals

    _routed.update(level=level, json_logs=json_logs)
    signals.setup_logging.connect(_setup_logging_receiver, weak=False)
    celery.apps.worker.safe_say = _say_as_log_line  # type: ignore[assignment]
