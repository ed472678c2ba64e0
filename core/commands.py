"""What every process's CLI commands share: the ``--config`` option and loading it.

A configuration error is one clear line and exit status 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.config import Config

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.yaml (default: $L3SPOT_CONFIG or ./config.yaml)"),
]


def load_for_cli(config: Path | None) -> Config:
    """The configuration from ``config`` (or the default path), logging set up; exit 2 on error."""
    from core.config import ConfigError, load_config
    from core.logs import setup_logging

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(cfg.logging.level, cfg.logging.json_logs)
    return cfg
