"""Audit log: one JSON line per association (accepted or rejected), never patient data.

Also one line per reader's review (issue 17: ``event`` ``review``, the review id, action,
user, chosen and previous slice, model version), one line per series quarantined by the
watcher and per deletion by retention (:mod:`service.retention`: kind, Study/Series UIDs,
bytes, age, reason), per failed login to the web page, per throttle of an address after
too many (``web_login_throttled``) and per change of its users (:mod:`service.web.auth`,
``l3spot users``: user name, role, who changed it, client address; never a password).

Each record holds the time, the calling and called AE titles, the peer address and port,
``outcome`` (``released``, ``aborted`` or ``rejected``), the rejection reason if any, the
numbers of instances stored and failed, and the duration in seconds. The file is appended
to with ``O_APPEND`` and fsynced per record (one record per association, so the cost is
negligible), and is opened per record so that log rotation by rename works.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from core.config import Config
from core.logs import log_event

log = logging.getLogger(__name__)

#: Keys an audit record may carry; anything else is dropped (keeps patient data out).
AUDIT_KEYS = (
    "time",
    "event",
    "calling_ae_title",
    "called_ae_title",
    "address",
    "port",
    "tls",
    "outcome",
    "reason",
    "rejection",
    "stored",
    "failed",
    "own_output_ignored",
    "duration_s",
    # retention (issue 16): what was deleted, of which series, how large and old
    "purged",
    "study_instance_uid",
    "series_instance_uid",
    "bytes_freed",
    "age_days",
    # review (issue 17): who accepted or corrected which result, at which slice
    "review_id",
    "review_action",
    "user",
    "slice_index",
    "previous_slice_index",
    "model_version",
    # locator versions (issue 17): promotions and rollbacks (l3spot models)
    "model_action",
    "previous_model_version",
    # web users (issue 17): failed logins and user management; never a password
    "role",
    "actor",
    "method",
    # failed sign-ins (issue 17): failures from that address in the window, and how long a
    # throttled address waits
    "failures",
    "retry_after_s",
)


def audit_log_path(config: Config) -> Path:
    """``logging.audit_log``, default ``<spool_dir>/../audit.log``."""
    return config.logging.audit_log or Path(config.node.spool_dir).parent / "audit.log"


class AuditLog:
    """Append-only JSON-lines audit file.

    Parameters
    ----------
    path : the file (its folder is created).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, **fields: Any) -> dict[str, Any]:
        """Append one record (only :data:`AUDIT_KEYS`; ``time`` is added) and return it.

        A failure to write is logged, never raised: auditing must not take the SCP down.
        """
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec.update({k: v for k, v in fields.items() if k in AUDIT_KEYS and k != "time"})
        line = (json.dumps(rec, default=str) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log_event(log, "audit_write_failed", level=logging.ERROR, error=str(exc))
        return rec

    def read(self) -> list[dict[str, Any]]:
        """All records (for tests and the operators' page)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
