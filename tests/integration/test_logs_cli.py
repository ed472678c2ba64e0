"""Logs of the real processes (issue 16): ``l3spot serve`` and the workers it starts write
only JSON lines on stdout and nothing on stderr, from start to stop; a startup error is one
``startup_failed`` line naming the port, key or folder, and a non-zero exit status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.jobs import JobState, JobStore
from tests.support.node import (
    CLI,
    NODELAY_ENV,
    free_port,
    kill_group,
    phantom_datasets,
    send_datasets,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as JSON (a line that is not JSON fails the test)."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stdout line {number} is not JSON: {line!r}") from None
    return lines


def _serve(config: Path, out: Path, err: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as o, open(err, "wb") as e:
        return subprocess.Popen(
            [*CLI, "serve", "--config", str(config)],
            stdout=o,
            stderr=e,
            env=NODELAY_ENV,
            start_new_session=True,
        )


def _events(path: Path) -> list[str]:
    try:
        return [str(line["event"]) for line in _json_lines(path)]
    except AssertionError:
        return []  # a line being written


def _run_to_exit(config: Path, tmp_path: Path) -> tuple[int, list[dict[str, Any]], str]:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    proc = _serve(config, out, err)
    try:
        rc = proc.wait(120)
    finally:
        kill_group(proc)
    return rc, _json_lines(out), err.read_text()


DELIVERY = (JobState.EXPORTING, JobState.DONE, JobState.FAILED)


def _state(jobs: JobStore, series_uid: str) -> JobState | None:
    try:
        return jobs.get(series_uid).state
    except Exception:  # no record yet
        return None


def test_serve_and_its_workers_write_only_json_lines_on_stdout(tmp_path: Path) -> None:
    port = free_port()
    down = free_port()  # a PACS that is down
    config = write_config(
        tmp_path / "config.yaml",
        tmp_path / "var" / "spool",
        port,
        export={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": down}]},
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    proc = _serve(config, out, err)
    try:
        wait_for(
            lambda: (
                sum(e.endswith(" ready.") for e in _events(out)) == 2
                and "destination_echo" in _events(out)
            ),
            120,
            "both workers ready and the C-ECHO result",
        )
        # one analysis (SEG, SR and SC built by highdicom), its export failing (PACS down)
        datasets = phantom_datasets(0, 40)
        assert send_datasets(datasets, port).error is None
        jobs = JobStore(tmp_path / "var" / "spool")
        series_uid = str(datasets[0].SeriesInstanceUID)
        wait_for(lambda: _state(jobs, series_uid) in DELIVERY, 180, "the analysis")
        proc.send_signal(signal.SIGTERM)  # the node only: it stops its workers
        assert proc.wait(60) == 0
    finally:
        kill_group(proc)
    lines = _json_lines(out)
    assert err.read_text() == ""
    events = [line["event"] for line in lines]
    (started,) = [line for line in lines if line["event"] == "node_started"]
    assert started["config_file"] == str(config.resolve())
    assert (started["ae_title"], started["port"]) == ("L3SPOT", port)
    assert started["spool_dir"] == str((tmp_path / "var" / "spool").resolve())
    assert started["broker"] == "embedded"
    assert started["destinations"] == [f"PACS@127.0.0.1:{down}"]
    assert started["models"]["locator"]["git_commit"]
    (echo,) = [line for line in lines if line["event"] == "destination_echo"]
    assert echo["ok"] is False and echo["error"] == "cannot connect: connection refused"
    assert events.count("worker_starting") == 2
    assert events.count("worker: Warm shutdown (MainProcess)") == 2  # Celery's own print
    assert events[-1] == "node_stopped"
    assert _state(jobs, series_uid) in DELIVERY
    by_logger = {str(line["logger"]).split(".")[0] for line in lines}
    assert {"service", "worker", "celery"} <= by_logger, by_logger
    noise = [line for line in lines if str(line["logger"]).startswith(("highdicom", "pynetdicom"))]
    assert all(line["level"] != "INFO" for line in noise), noise[:3]


def test_a_busy_port_is_one_line_that_names_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "config.yaml", tmp_path / "var" / "spool", port)
        rc, lines, err = _run_to_exit(config, tmp_path)
    assert rc == 1 and err == ""
    failed = [line for line in lines if line["event"] == "startup_failed"]
    assert [f["error"] for f in failed] == [
        f"cannot listen on 127.0.0.1:{port} (node.host, node.port): address already in use"
    ]
    assert not any("Traceback" in json.dumps(line) for line in lines)
    # the workers started before the bind failed are gone with the node
    for pid in [line["pid"] for line in lines if line["event"] == "worker_started"]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_an_invalid_configuration_is_one_line_that_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "var" / "spool", 70000)
    rc, lines, err = _run_to_exit(config, tmp_path)
    assert rc == 2 and err == ""
    (line,) = lines
    assert line["event"] == "startup_failed" and line["level"] == "ERROR"
    assert "node.port: Input should be less than or equal to 65535" in line["error"]


def test_a_spool_that_cannot_be_created_is_one_line_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    spool = tmp_path / "a-file" / "spool"
    config = write_config(tmp_path / "config.yaml", spool, free_port())
    rc, lines, err = _run_to_exit(config, tmp_path)
    assert rc == 1 and err == ""
    (line,) = [line for line in lines if line["event"] == "startup_failed"]
    assert line["error"].startswith(f"node.spool_dir {spool}: cannot create: ")
    assert os.path.isfile(tmp_path / "a-file")
