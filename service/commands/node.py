"""CLI commands of the node: ``serve``, ``jobs``, ``retry``, ``echo``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from core.commands import ConfigOpt
from core.commands import load_for_cli as _load


def serve(
    config: ConfigOpt = None,
    web: Annotated[
        bool | None, typer.Option("--web/--no-web", help="operators' web page (web.enabled)")
    ] = None,
) -> None:
    """Run the DICOM node (C-STORE/C-ECHO SCP) until SIGTERM/Ctrl-C.

    With ``broker.url: null`` it also runs its own workers: the whole node on one machine.
    Logs are JSON lines on stdout; a startup error (invalid configuration, port in use,
    folder not writable) is one ``startup_failed`` line and a non-zero exit status.
    """
    from core.commands import fail
    from core.errors import L3SpotError
    from service.node import Node
    from service.startup import check_folders

    cfg = _load(config, service=True)
    if web is not None:
        cfg.web.enabled = web
    try:
        check_folders(cfg)
        node = Node(cfg, config.resolve() if config else None)
        node.serve_forever()
    except L3SpotError as exc:  # StartupError, WebConfigError, NetPatchError, ...
        fail(exc)
    except OSError as exc:
        if exc.filename is None:
            raise  # not a file or folder: a genuine crash, keep the traceback
        fail(f"{exc.filename}: {exc.strerror or exc}")


def jobs(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    state: Annotated[list[str] | None, typer.Option(help="only these states")] = None,
) -> None:
    """List the job records (state, instances, timings, reason) of every series."""
    from service.jobs import JobStore, format_jobs

    cfg = _load(config)
    records = JobStore.from_config(cfg).list(tuple(state) if state else None)
    if as_json:
        for r in records:
            typer.echo(json.dumps(r.as_dict()))
    else:
        typer.echo(format_jobs(records))


def retry(
    series_uid: Annotated[str, typer.Argument(help="Series Instance UID")],
    config: ConfigOpt = None,
    analysis: Annotated[
        bool, typer.Option("--analysis", help="re-run the analysis even if results exist")
    ] = False,
) -> None:
    """Re-queue one series: its export if its results exist, else its analysis."""
    from core.queue import configure_app
    from service.jobs import JobStore
    from service.requeue import RetryError, requeue_series

    cfg = _load(config)
    store = JobStore.from_config(cfg)
    try:
        what = requeue_series(cfg, store, configure_app(cfg), series_uid, analysis=analysis)
    except RetryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{what} re-queued: {series_uid}")


def echo(
    config: ConfigOpt = None,
    host: Annotated[
        str | None, typer.Option(help="default: node.host (0.0.0.0 -> 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="default: node.port")] = None,
    called_ae: Annotated[str | None, typer.Option(help="default: node.ae_title")] = None,
    calling_ae: Annotated[
        str | None, typer.Option(help="our AE title (default: L3SPOT_ECHO)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
) -> None:
    """C-ECHO a DICOM node (default: this node); exit 0 when it answers success.

    Used as the container health check. The C-ECHO is :func:`core.echo.echo_scp`, the one
    the web page's test button and ``/readyz`` use.
    """
    from core.echo import DEFAULT_CALLING_AE, connect_address, echo_scp

    cfg = _load(config)
    h = host or connect_address(cfg.node.host)
    p = port or cfg.node.port
    result = echo_scp(
        h, p, called_ae or cfg.node.ae_title, calling_ae or DEFAULT_CALLING_AE, timeout
    )
    if not result.ok:
        typer.echo(f"echo {h}:{p}: {result.outcome}: {result.detail}", err=True)
        raise typer.Exit(1)
    typer.echo(f"echo {h}:{p}: success ({result.rtt_ms:.0f} ms)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.command()(serve)
    app.command()(jobs)
    app.command()(retry)
    app.command()(echo)
