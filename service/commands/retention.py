"""CLI command of the node's retention: ``l3spot retention [--dry-run]``."""

from __future__ import annotations

from typing import Annotated

import typer

from core.commands import ConfigOpt
from core.commands import load_for_cli as _load


def retention(
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only print what would be deleted")
    ] = False,
) -> None:
    """Delete old finished series (spool, results, quarantine) by age and storage watermark.

    Never what is being received, queued, analysed or exported, or not yet exported. Prints
    one line per deletion (kind, UIDs, age, size, why) and the totals; the node runs the
    same every ``retention.interval_minutes``.
    """
    from service.audit import AuditLog, audit_log_path
    from service.jobs import JobStore
    from service.retention import format_report, run_retention
    from service.spool import Spool

    cfg = _load(config)
    node = cfg.node
    spool = Spool(node.spool_dir, node.resolved_quarantine_dir(), fsync=node.fsync)
    audit = None if dry_run else AuditLog(audit_log_path(cfg))
    report = run_retention(cfg, JobStore.from_config(cfg), spool, audit, dry_run=dry_run)
    typer.echo(format_report(report))


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command()(retention)
