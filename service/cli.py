"""The ``l3spot`` command line: one Typer app, commands registered by topic.

Each module in :mod:`service.commands` owns the commands of one stage and exposes
``register(app)``; this file only assembles them.
"""

from __future__ import annotations

import typer

from service.commands import analysis, composition, imaging, locator, node

app = typer.Typer(
    name="l3spot",
    help="DICOM node that finds the L3 slice in CT and measures body composition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DICOM node that finds the L3 slice in CT and measures body composition."""


@app.command()
def version() -> None:
    """Print the l3spot version."""
    from worker import __version__

    typer.echo(f"l3spot {__version__}")


for _module in (node, imaging, locator, composition, analysis):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
