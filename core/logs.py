"""Structured logging: one JSON object per line, carrying Study/Series Instance UIDs.

The long-running processes (``l3spot serve`` and ``l3spot worker``) write their logs to
**stdout**, one JSON object per line, so a container runtime or journald collects one stream
that a log shipper can parse line by line; Python :mod:`warnings` are logged too (as
``py.warnings``), and Celery's own output goes through the same handler
(:mod:`worker.celery_logs`). One-shot commands (``l3spot jobs``, ``analyze``, ...) keep their
logs on stderr, so their stdout stays their result.

Never pass patient name, ID or birth date as a field: :func:`log_event` drops any key in
:data:`FORBIDDEN_KEYS` as a last line of defence, but callers must not send them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORBIDDEN_KEYS = frozenset(
    {"patient_name", "PatientName", "patient_id", "PatientID", "birth_date", "PatientBirthDate"}
)

#: Libraries that are chatty at INFO (pynetdicom: every association; highdicom: every SEG/SR
#: it builds): only their warnings and errors are logged.
QUIET_LOGGERS = ("pynetdicom", "highdicom")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if k not in FORBIDDEN_KEYS}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, process (id), event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "event": record.getMessage(),
        }
        payload.update(_fields(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger event key=value ...`` for a person reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in _fields(record).items())
        if not extra:
            return text
        head, sep, tail = text.partition("\n")  # fields before a traceback, not after it
        return f"{head} {extra}{sep}{tail}"


def setup_logging(
    level: str = "INFO", json_logs: bool = True, stream: TextIO | None = None
) -> None:
    """Configure the root logger: one handler, JSON lines (or plain text) on ``stream``.

    Also routes Python :mod:`warnings` into logging (``py.warnings``) and sets the
    libraries of :data:`QUIET_LOGGERS` to WARNING. Calling it again replaces the handler.

    Parameters
    ----------
    level : root level name ("DEBUG", "INFO", "WARNING", ...).
    json_logs : one JSON object per line (True) or :class:`PlainFormatter` text.
    stream : where lines go; default ``sys.stdout`` as it is at the call.
    """
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json_logs else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (e.g. ``series_instance_uid=...``)."""
    safe = {k: v for k, v in fields.items() if k not in FORBIDDEN_KEYS}
    logger.log(level, event, extra={"fields": safe})
