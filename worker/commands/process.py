"""CLI command of the analysis process: ``l3spot worker``, a Celery worker for the broker."""

from __future__ import annotations

from typing import Annotated

import typer

from core.commands import ConfigOpt
from core.commands import load_for_cli as _load


def worker(
    config: ConfigOpt = None,
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "analysis,export",
    concurrency: Annotated[
        int | None, typer.Option(help="default broker.worker_concurrency")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="prefork|solo|threads")] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name")] = None,
) -> None:
    """Run a Celery worker for the configured broker (several may share the spool).

    Logs, Celery's included, are JSON lines on stdout (:mod:`worker.celery_logs`).
    """
    import logging

    from core.logs import log_event
    from core.queue import broker_label, configure_app
    from worker.celery_logs import CELERY_QUIET, route_celery_output

    cfg = _load(config, service=True)
    route_celery_output(cfg.logging.level, cfg.logging.json_logs)
    app = configure_app(cfg)
    if "analysis" in queues.split(","):
        # import torch and the pipeline once here, before the pool forks: each new pool
        # child (first task, or a replacement for a killed one) starts seconds sooner
        import worker.pipeline  # noqa: F401
    concurrency = concurrency or cfg.broker.worker_concurrency
    pool = pool or cfg.broker.worker_pool
    log_event(
        logging.getLogger("worker"),
        "worker_starting",
        queues=queues.split(","),
        concurrency=concurrency,
        pool=pool,
        broker=broker_label(cfg),
        hostname=hostname,
    )
    argv = [
        CELERY_QUIET,
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        cfg.logging.level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv)


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command()(worker)
