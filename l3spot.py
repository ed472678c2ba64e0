"""The ``l3spot`` command line: the one place that assembles the commands of every package.

Each process owns its commands: :mod:`service.commands` (the node), :mod:`worker.commands`
(analysis, stages, phantoms, training) and :mod:`research.commands` (evaluation, present only
where :mod:`research` is installed). A command's module is imported only when that command
runs, so ``l3spot serve`` loads the node's code and nothing of the worker or of torch.
"""

from __future__ import annotations

import importlib

import click
import typer
import typer.main
from typer.core import TyperGroup

#: command name -> the module that registers it (``register(app)``).
COMMANDS: dict[str, str] = {
    "serve": "service.commands.node",
    "jobs": "service.commands.node",
    "retry": "service.commands.node",
    "echo": "service.commands.node",
    "retention": "service.commands.retention",
    "users": "service.commands.users",
    "models": "service.commands.models",
    "destinations": "worker.commands.export",
    "worker": "worker.commands.process",
    "analyze": "worker.commands.analysis",
    "convert": "worker.commands.convert",
    "mip": "worker.commands.imaging",
    "phantom": "worker.commands.imaging",
    "locate": "worker.commands.locator",
    "train": "worker.commands.locator",
    "composition": "worker.commands.composition",
    "train-seg": "worker.commands.composition",
    "train-spine": "worker.commands.vertebrae",
    "evaluate": "research.commands",
    "evaluate-composition": "research.commands",
    "calibrate-locator": "research.commands",
    "calibrate-levels": "research.commands",
    "evaluate-crops": "research.commands",
    "evaluate-levels": "research.commands",
}

HELP = "DICOM node that finds the L3 slice in CT and measures body composition."


def _module_commands(module_name: str) -> dict[str, click.Command]:
    """The click commands that ``module_name.register`` adds to a fresh Typer app."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    importlib.import_module(module_name).register(sub)
    group = typer.main.get_group(sub)
    return dict(group.commands)


class _LazyGroup(TyperGroup):
    """A click group whose commands are imported on first use (click's lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module = COMMANDS[cmd_name]
        try:
            found = _module_commands(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                return None  # e.g. research/ is not installed in the runtime image
            raise
        for name, command in found.items():
            self.add_command(command, name)
        return self.commands.get(cmd_name)


app = typer.Typer(
    name="l3spot",
    cls=_LazyGroup,
    help=HELP,
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
    from core import __version__

    typer.echo(f"l3spot {__version__}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
