"""What every process's CLI commands share: the ``--config`` option and loading it.

A configuration error is one clear line and a non-zero exit status, never a traceback:
``error: ...`` on stderr for one-shot commands, a JSON ``startup_failed`` log line on stdout
for the long-running ones (``serve``, ``worker``), whose logs are on stdout
(:mod:`core.logs`).
"""

from __future__ import annotations

import getpass
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from core.config import Config

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.yaml (default: $L3SPOT_CONFIG or ./config.yaml)"),
]

#: Exit status of a configuration error (as click's usage errors).
EXIT_CONFIG = 2
#: Exit status of any other startup error (port in use, folder not writable, ...).
EXIT_STARTUP = 1

log = logging.getLogger("l3spot")


def load_for_cli(config: Path | None, service: bool = False) -> Config:
    """The configuration from ``config`` (or the default path), logging set up.

    Parameters
    ----------
    config : the ``--config`` value (None: ``$L3SPOT_CONFIG`` or ``./config.yaml``).
    service : True for a long-running process (``serve``, ``worker``): logs go to stdout
        and an error is a ``startup_failed`` log line; False: logs go to stderr and an error
        is ``error: ...`` on stderr.

    Raises
    ------
    typer.Exit
        With status :data:`EXIT_CONFIG` when the configuration is invalid.
    """
    from core.config import ConfigError, load_config
    from core.logs import setup_logging

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        if service:
            setup_logging()  # the configured format is unknown: the default, JSON on stdout
        fail(exc, EXIT_CONFIG, service)
    setup_logging(
        cfg.logging.level, cfg.logging.json_logs, stream=sys.stdout if service else sys.stderr
    )
    return cfg


def fail(error: BaseException | str, code: int = EXIT_STARTUP, service: bool = True) -> NoReturn:
    """Report a startup error as one line and exit with ``code``.

    Parameters
    ----------
    error : the error; its text must name what is wrong (the key, port or folder).
    code : exit status, non-zero.
    service : as in :func:`load_for_cli`: a ``startup_failed`` log line (logging must be
        set up) or ``error: ...`` on stderr.

    Raises
    ------
    typer.Exit
        Always.
    """
    from core.logs import log_event

    text = str(error)
    if service:
        log_event(log, "startup_failed", logging.ERROR, error=text, exit_code=code)
    else:
        typer.echo(f"error: {text}", err=True)
    raise typer.Exit(code)


def os_user() -> str:
    """The operating-system account running the command (audit records of CLI changes);
    ``unknown`` when the system cannot say (a container without a passwd entry)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the checkout l3spot runs from (training records), with ``-dirty``
    appended when tracked files differ from it (the record then names a commit that did not
    make the result); "unknown" outside a git checkout or without git.

    ``cwd``: a folder inside the checkout (default: l3spot's own).
    """
    where = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=where
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=where,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else head


def command_line() -> str:
    """This process's ``l3spot`` command line, shell-quoted (training records)."""
    return "l3spot " + " ".join(shlex.quote(a) for a in sys.argv[1:])
