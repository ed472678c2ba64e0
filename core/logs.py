"""Structured logging: one JSON object per line, carrying Study/Series Instance UIDs.

Never pass patient name, ID or birth date as a field: :func:`log_event` drops any key in
:data:`FORBIDDEN_KEYS` as a last line of defence, but callers must not send them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORBIDDEN_KEYS = frozenset(
    {"patient_name", "PatientName", "patient_id", "PatientID", "birth_date", "PatientBirthDate"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update({k: v for k, v in fields.items() if k not in FORBIDDEN_KEYS})
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Configure the root logger once (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO: keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (e.g. ``series_instance_uid=...``)."""
    safe = {k: v for k, v in fields.items() if k not in FORBIDDEN_KEYS}
    logger.log(level, event, extra={"fields": safe})
