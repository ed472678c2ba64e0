"""CLI of the site's locator versions (issue 17): ``l3spot models list|promote|rollback``.

``l3spot train --from-reviews`` (:mod:`worker.commands.learning`) makes the versions. Every
change of the active version is one audit record (``event: model``) and one history
entry in ``active.json`` (:mod:`core.model_registry`); workers pick the active version up at
their next analysis.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from core.commands import ConfigOpt, fail, os_user
from core.commands import load_for_cli as _load

models_app = typer.Typer(
    help="The site's locator versions: list, promote, roll back (docs/learning.md).",
    no_args_is_help=True,
)


def _audit(cfg: Any, entry: dict[str, Any]) -> None:
    from service.audit import AuditLog, audit_log_path

    AuditLog(audit_log_path(cfg)).record(
        event="model",
        model_action=entry["action"],
        model_version=entry["version"],
        previous_model_version=entry["previous"],
        user=entry["by"],
        reason=entry["reason"],
    )


@models_app.command("list")
def list_versions(config: ConfigOpt = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every locator version, which one is active, and how each did in its evaluation."""
    from core.model_registry import ModelRegistry

    cfg = _load(config)
    registry = ModelRegistry.from_config(cfg)
    state = registry.state()
    rows = []
    for v in registry.versions():
        ev = v.evaluation
        site = ev.get("site_held_out", {}).get("candidate", {})
        rows.append(
            {
                "version": v.label,
                "active": v.name == state["active"],
                "base": v.record.get("base_version"),
                "trained": v.record.get("started"),
                "site_held_out_right": site.get("right"),
                "decision": ev.get("decision"),
                "promoted": any(
                    h.get("version") == v.name and h.get("action") == "promote"
                    for h in state["history"]
                ),
            }
        )
    if as_json:
        typer.echo(json.dumps({"versions": rows, "history": state["history"]}, indent=2))
        return
    for r in rows:
        mark = "*" if r["active"] else " "
        right = (
            ""
            if r["site_held_out_right"] is None
            else f"{100 * r['site_held_out_right']:.0f} % right held-out"
        )
        typer.echo(
            f"{mark} {r['version']:<40} {r['trained'] or '':<22} {right:<22} {r['decision'] or ''}"
        )


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="site-NNNN, or 'shipped'")],
    reason: Annotated[str, typer.Option(help="why (kept in the history)")] = "promoted by hand",
    config: ConfigOpt = None,
) -> None:
    """Make a version the active one (the next analyses use it)."""
    from core.model_registry import ModelRegistry, ModelRegistryError

    cfg = _load(config)
    try:
        entry = ModelRegistry.from_config(cfg).promote(version, os_user(), reason)
    except ModelRegistryError as exc:
        fail(str(exc))
    _audit(cfg, entry)
    typer.echo(f"active locator version: {entry['version']} (was {entry['previous']})")


@models_app.command("rollback")
def rollback(
    reason: Annotated[str, typer.Option(help="why (kept in the history)")] = "rolled back",
    config: ConfigOpt = None,
) -> None:
    """Return to the version that was active before the current one was promoted."""
    from core.model_registry import ModelRegistry, ModelRegistryError

    cfg = _load(config)
    try:
        entry = ModelRegistry.from_config(cfg).rollback(os_user(), reason)
    except ModelRegistryError as exc:
        fail(str(exc))
    _audit(cfg, entry)
    typer.echo(f"active locator version: {entry['version']} (was {entry['previous']})")


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""
    app.add_typer(models_app, name="models")
