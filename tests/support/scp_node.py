"""An in-process SCP (:func:`service.scp.start_scp`) with its own spool, audit log and
injectable free disk space, for the network tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import Config
from service import scp
from service.audit import AuditLog
from service.spool import Spool
from tests.support.node import free_port

MIB = 1024 * 1024


class ScpNode:
    """An in-process SCP with its own spool, audit log and injectable free disk space."""

    def __init__(self, tmp: Path, **overrides: dict[str, Any]) -> None:
        data: dict[str, Any] = {
            "node": {"port": free_port(), "host": "127.0.0.1", "spool_dir": str(tmp / "spool")},
            "logging": {"audit_log": str(tmp / "audit.log")},
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        self.config = Config.model_validate(data)
        self.free = 10_000 * MIB
        self.spool = Spool(tmp / "spool", tmp / "quarantine")
        self.audit = AuditLog(tmp / "audit.log")
        self.stored: list[tuple[str, str, Path]] = []
        self.ae, self.server = scp.start_scp(
            self.config,
            self.spool,
            lambda *a: self.stored.append(a),
            free_bytes=lambda path: self.free,
            audit=self.audit,
        )
        self.port = self.config.node.port

    def records(
        self,
        outcome: str | None = None,
        wait_s: float = 5.0,
        event: str | None = None,
        at_least: int = 1,
    ) -> list[dict[str, Any]]:
        """Audit records (waits up to ``wait_s`` for ``at_least`` of them: a record is
        written as its association or connection ends)."""
        deadline = time.monotonic() + wait_s
        while True:
            recs = [
                r
                for r in self.audit.read()
                if outcome in (None, r["outcome"]) and event in (None, r.get("event"))
            ]
            if len(recs) >= at_least or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)


@pytest.fixture()
def make_node(tmp_path: Path) -> Iterator[Callable[..., ScpNode]]:
    """Factory of :class:`ScpNode` (``make_node(node={...})``), all shut down afterwards."""
    nodes: list[ScpNode] = []

    def factory(**overrides: dict[str, Any]) -> ScpNode:
        nodes.append(ScpNode(tmp_path / f"n{len(nodes)}", **overrides))
        return nodes[-1]

    yield factory
    for n in nodes:
        n.ae.shutdown()
