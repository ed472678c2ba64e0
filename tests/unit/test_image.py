"""The runtime image without Docker: what the Dockerfile copies runs the compose file's commands,
and nothing of research/ (or tests/) is copied or needed.

The files the Dockerfile's ``COPY`` lines name are copied to a folder that stands for
``/app``; a fresh interpreter that cannot import ``research`` or ``tests`` (a meta-path
blocker: an editable install of the checkout would otherwise find them) runs every command
and health check of ``docker-compose.yml`` with ``--help``, imports the worker's task and
training modules, and sees that the development-only commands are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEV_ONLY = ("research", "tests", "bench", "docs", ".ci")


def _copied_sources() -> list[str]:
    """Repository paths the Dockerfile copies into /app (``COPY src... dest``)."""
    sources: list[str] = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not parts[1].startswith("--"):
            dest = parts[-1]
            if dest.startswith("/") and not dest.startswith("/app"):
                continue  # e.g. the config under /etc
            sources += parts[1:-1]
    return sources


def _compose_commands() -> list[list[str]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = []
    for service in compose["services"].values():
        if service.get("image", "").startswith("l3spot"):
            commands.append(service["command"])
            test = service.get("healthcheck", {}).get("test")
            if test:
                assert test[:2] == ["CMD", "l3spot"], test
                commands.append(test[2:])
    return commands


def test_dockerfile_copies_the_runtime_packages_and_no_development_folder() -> None:
    sources = _copied_sources()
    assert {"core", "service", "worker", "l3spot.py", "pyproject.toml", "models"} <= set(sources)
    assert not set(sources) & set(DEV_ONLY), sources
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"research", "tests"} <= ignored


IMAGE_PROCESS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("research", "tests"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    import typer.main
    from click.testing import CliRunner

    import l3spot

    assert l3spot.__file__.startswith(sys.argv[1]), l3spot.__file__
    cli = typer.main.get_command(l3spot.app)
    out = {}
    for cmd in json.loads(sys.argv[2]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        out[" ".join(cmd)] = r.exit_code
    for cmd in (["evaluate"], ["evaluate-composition"]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        out[" ".join(cmd)] = r.exit_code
    import worker.commands.composition, worker.commands.locator, worker.pipeline, worker.tasks
    import worker.training.locator, worker.training.segmentation  # noqa: F401
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"research", "tests"})
    print(json.dumps({"exit_codes": out, "loaded": loaded}))
    """
)


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_the_image_files_run_every_compose_command_without_research(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    for src in _copied_sources():
        path = REPO / src
        if path.is_dir():
            shutil.copytree(path, app / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, app / src)
    commands = _compose_commands()
    assert ["serve"] in commands and ["worker", "--queues", "analysis"] in commands
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT")}
    env["PYTHONPATH"] = str(app)
    proc = subprocess.run(
        [sys.executable, "-c", IMAGE_PROCESS, str(app), json.dumps(commands)],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = got["exit_codes"]
    assert all(codes[" ".join(c)] == 0 for c in commands), codes
    assert codes["evaluate"] != 0 and codes["evaluate-composition"] != 0  # not in the image
    assert got["loaded"] == []
