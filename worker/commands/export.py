"""CLI command of the export: ``l3spot destinations``, each PACS's state from the job records."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from core.commands import ConfigOpt
from core.commands import load_for_cli as _load
from core.jobs import DestinationRecord


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def format_destinations(records: list[DestinationRecord]) -> str:
    """Plain-text table for ``l3spot destinations`` (one line per destination).

    Columns: label (``AE@host:port``), state (``ok``/``retrying``/``down``/``unknown``),
    series waiting for a retry, series given up, last success, last attempt, last error.
    """
    lines = [
        f"{'destination':40}  {'state':8}  {'waiting':>7}  {'failed':>6}  "
        f"{'last ok':19}  {'last attempt':19}  last error"
    ]
    for d in records:
        error = (d.last_error or "-") if d.consecutive_failures else "-"
        lines.append(
            f"{d.label:40}  {d.state:8}  {d.waiting:>7}  {d.failed:>6}  "
            f"{_when(d.last_ok_at):19}  {_when(d.last_attempt_at):19}  {error}"
        )
    return "\n".join(lines)


def destinations(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Show each destination's state (ok, retrying, down), last contact, last error, waiting series.

    Read from the job records (:meth:`core.jobs.JobStore.destination_states`): no DICOM
    traffic. A ``down`` destination's waiting series are sent again as soon as one attempt
    reaches it (docs/reliability.md "Export that waits for the PACS").
    """
    from core.jobs import JobStore

    cfg = _load(config)
    labels = [d.label for d in cfg.export.destinations]
    records = JobStore.from_config(cfg).destination_states(labels)
    if as_json:
        for r in records:
            typer.echo(json.dumps(r.as_dict()))
    else:
        typer.echo(format_destinations(records))


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command()(destinations)
