"""``l3spot destinations``: each configured PACS's state, from the job records."""

from __future__ import annotations

import json
from pathlib import Path

import typer.main
import yaml
from click.testing import CliRunner

import l3spot
from core.jobs import JobStore

UP, DOWN, NEW = "UP@127.0.0.1:104", "DOWN@pacs.example:104", "NEW@h:104"


def test_destinations_lists_each_state_with_the_waiting_series(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = tmp_path / "config.yaml"
    dests = [
        {"ae_title": ae, "host": rest.split(":")[0], "port": int(rest.split(":")[1])}
        for ae, rest in (label.split("@") for label in (UP, DOWN, NEW))
    ]
    config.write_text(
        yaml.safe_dump({"node": {"spool_dir": str(spool)}, "export": {"destinations": dests}})
    )
    jobs = JobStore(spool)
    jobs.mark_queued("1.2.3", 30)
    jobs.start_export("1.2.3", [UP, DOWN])
    jobs.record_export_attempt("1.2.3", UP, True, None, None, final=False)
    jobs.record_destination_attempt(UP, reached=True)
    for _ in range(3):
        jobs.record_export_attempt("1.2.3", DOWN, False, None, "connection refused", final=False)
        jobs.record_destination_attempt(DOWN, reached=False, error="connection refused")
    cli = typer.main.get_command(l3spot.app)
    out = CliRunner().invoke(cli, ["destinations", "--config", str(config)])
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.output.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (UP, "ok", "0", "0"),
        (DOWN, "down", "1", "0"),
        (NEW, "unknown", "0", "0"),
    ]
    assert out.output.splitlines()[2].endswith("connection refused")
    out = CliRunner().invoke(cli, ["destinations", "--config", str(config), "--json"])
    states = [json.loads(line) for line in out.output.splitlines()]
    assert [(s["label"], s["state"], s["waiting"]) for s in states] == [
        (UP, "ok", 0),
        (DOWN, "down", 1),
        (NEW, "unknown", 0),
    ]
