"""CLI commands of the web page's named users: ``l3spot users add|list|remove``.

The password is read from a hidden prompt (asked twice) or, with ``--password-stdin``, from
the first line of standard input; never from the command line, where ``ps`` and the shell
history would show it. Each change is one audit record (user, role, the operating-system
account that made it), without the password.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from core.commands import ConfigOpt, fail, os_user
from core.commands import load_for_cli as _load

users_app = typer.Typer(
    help="Named users of the web page (web.auth: users or proxy) and their roles.",
    no_args_is_help=True,
)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="user name (letters, digits, . _ @ -)")],
    role: Annotated[
        str, typer.Option("--role", help="reader (read, review) or administrator (also retry)")
    ] = "reader",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin's first line")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="change an existing user's role and password")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a user of the web page (or, with --replace, change one's role and password)."""
    from service.audit import AuditLog, audit_log_path
    from service.jobs import JobStore
    from service.users import Role, UserError, add_user

    cfg = _load(config)
    try:
        chosen = Role(role)
    except ValueError:
        fail(f"--role {role!r}: one of {', '.join(Role)}", 2, service=False)
    password = _read_password(password_stdin)
    try:
        new = add_user(JobStore.from_config(cfg), name, chosen, password, replace=replace)
    except UserError as exc:
        fail(exc, 1, service=False)
    AuditLog(audit_log_path(cfg)).record(
        event="user_added" if new else "user_changed", user=name, role=str(chosen), actor=os_user()
    )
    typer.echo(f"{'added' if new else 'changed'} {name} ({chosen})")


@users_app.command("list")
def list_users(config: ConfigOpt = None) -> None:
    """List the users: name, role, when added and last changed."""
    from service.jobs import JobStore

    cfg = _load(config)
    rows = JobStore.from_config(cfg).users()
    if not rows:
        typer.echo("no users (add one: l3spot users add NAME --role administrator)")
        return
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.created_at))
        changed = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.updated_at))
        typer.echo(f"{row.name:<24} {row.role:<14} added {created}  changed {changed}")


@users_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="user name")],
    config: ConfigOpt = None,
) -> None:
    """Remove a user; the web page refuses the name from the next request on."""
    from service.audit import AuditLog, audit_log_path
    from service.jobs import JobStore
    from service.users import UserError, remove_user

    cfg = _load(config)
    try:
        remove_user(JobStore.from_config(cfg), name)
    except UserError as exc:
        fail(exc, 1, service=False)
    AuditLog(audit_log_path(cfg)).record(event="user_removed", user=name, actor=os_user())
    typer.echo(f"removed {name}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.add_typer(users_app, name="users")
