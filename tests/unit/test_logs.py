"""Logs (issue 16): JSON lines on stdout, warnings and Celery routed, quiet libraries,
one-line startup errors, the startup summary and the destinations' C-ECHO."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Config, ConfigError, Destination, load_config
from core.errors import StartupError
from core.logs import PlainFormatter, log_event, setup_logging
from core.queue import broker_label
from service.startup import (
    _echo_destination,
    check_folders,
    listen_error,
    log_node_started,
    model_version,
    model_versions,
    startup_summary,
)
from tests.support.node import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in ("highdicom", "pynetdicom")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_logs_are_json_lines_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    log_event(logging.getLogger("t"), "thing_done", series_instance_uid="1.2.3", PatientName="X")
    out, err = capsys.readouterr()
    assert err == ""
    (line,) = _json_lines(out)
    assert line["event"] == "thing_done" and line["series_instance_uid"] == "1.2.3"
    assert line["level"] == "INFO" and line["logger"] == "t" and isinstance(line["process"], int)
    assert "PatientName" not in line


def test_python_warnings_are_logged_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        setup_logging("INFO")
        warnings.warn("running as root is not recommended", UserWarning, stacklevel=1)
    out, err = capsys.readouterr()
    assert err == ""
    (line,) = _json_lines(out)
    assert line["logger"] == "py.warnings" and line["level"] == "WARNING"
    assert "running as root" in str(line["event"])


def test_building_a_seg_logs_nothing_of_highdicom_at_info(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """highdicom logs each module it copies at INFO (about 10 lines per SEG)."""
    from tests.support.outputs import L3_INDEX, ct_dataset, synthetic_hu, synthetic_labels
    from worker.outputs.seg import build_seg

    setup_logging("INFO")
    labels = synthetic_labels()
    build_seg(ct_dataset(L3_INDEX, synthetic_hu(labels)), labels)
    logging.getLogger("highdicom.base").warning("a real problem")
    lines = _json_lines(capsys.readouterr().out)
    assert [line["event"] for line in lines if str(line["logger"]).startswith("highdicom")] == [
        "a real problem"
    ]


def test_plain_text_logs_show_the_fields() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "export_done", None, None)
    record.fields = {"series_instance_uid": "1.2", "PatientID": "SECRET"}
    text = PlainFormatter().format(record)
    assert text.endswith('INFO t export_done series_instance_uid="1.2"'), text


def test_a_configuration_error_is_one_line_that_names_the_key_not_its_value() -> None:
    env = {"L3SPOT__NODE__PORT": "70000", "L3SPOT__WEB__PORT": "s3cret-value"}
    with pytest.raises(ConfigError) as err:
        load_config(environ=env)
    text = str(err.value)
    assert "\n" not in text
    assert "node.port:" in text and "web.port:" in text
    assert "s3cret-value" not in text


def test_the_broker_url_is_logged_without_its_password() -> None:
    cfg = Config()
    assert broker_label(cfg) == "embedded"
    cfg.broker.url = "redis://:s3cret@redis.local:6379/0"
    assert broker_label(cfg) == "redis://:**@redis.local:6379/0"
    cfg.broker.url = "redis://u:p1@a:6379/0;redis://u:p2@b:6379/0"
    assert "p1" not in broker_label(cfg) and "p2" not in broker_label(cfg)
    assert broker_label(cfg).count("@") == 2


def test_model_version_reads_the_training_record_and_hashes_the_file(tmp_path: Path) -> None:
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()[:12]
    assert model_version(weights) == {"file": "m.pt", "sha256": digest}
    record = {"git_commit": "578bf5a7d57502f4a7946e8dd61e9842483fcb5f", "started": "2026-11-21"}
    weights.with_suffix(".json").write_text(json.dumps(record))
    assert model_version(weights) == {
        "file": "m.pt",
        "sha256": digest,
        "git_commit": "578bf5a7d575",
        "trained": "2026-11-21",
    }
    assert model_version(tmp_path / "gone.pt") == {"file": "gone.pt", "missing": True}


def test_the_shipped_models_carry_their_training_commit() -> None:
    models = model_versions(Config())
    for role in ("locator", "refine"):
        record = json.loads(
            REPO.joinpath("models", models[role]["file"]).with_suffix(".json").read_text()
        )
        assert models[role]["git_commit"] == record["git_commit"][:12]
        assert len(models[role]["sha256"]) == 12
        assert models[role]["version"].startswith("shipped (")
    assert models["composition"] == {"method": "classical"}


def test_the_startup_summary_names_the_active_locator_version(tmp_path: Path) -> None:
    import shutil

    from core.model_registry import COARSE_FILE, ModelRegistry

    cfg = Config.model_validate({"node": {"spool_dir": str(tmp_path / "spool")}})
    registry = ModelRegistry.from_config(cfg)
    name, folder = registry.new_version()
    shutil.copy(cfg.locator.weights, folder / COARSE_FILE)
    registry.promote(name, "alice", "test")
    models = model_versions(cfg)
    assert models["locator"]["version"] == name and models["locator"]["file"] == COARSE_FILE
    assert "refine" not in models  # this version has no refinement stage
    (folder / COARSE_FILE).unlink()
    assert model_versions(cfg)["locator"]["missing"] is True


def test_the_startup_summary_names_what_an_operator_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("node: {ae_title: NODE1, port: 11112}\n")
    cfg = load_config(path, environ={})
    cfg.node.spool_dir = tmp_path / "spool"
    cfg.broker.url = "redis://:s3cret@redis.local:6379/0"
    cfg.export.destinations = [Destination(ae_title="PACS", host="pacs.local", port=104)]
    summary = startup_summary(cfg, path, port=11112, web_url="http://127.0.0.1:8080")
    assert summary["config_file"] == str(path.resolve())
    assert (summary["ae_title"], summary["port"]) == ("NODE1", 11112)
    assert summary["spool_dir"] == str((tmp_path / "spool").resolve())
    assert summary["broker"] == "redis://:**@redis.local:6379/0"
    assert summary["destinations"] == ["PACS@pacs.local:104"]
    assert summary["models"]["locator"]["file"] == cfg.locator.weights.name
    assert "s3cret" not in json.dumps(summary)
    monkeypatch.chdir(tmp_path.parent)  # no config.yaml there
    monkeypatch.delenv("L3SPOT_CONFIG", raising=False)
    assert startup_summary(Config())["config_file"] == "built-in defaults"


def _destination(port: int) -> Destination:
    return Destination(ae_title="PACS", host="127.0.0.1", port=port)


def test_a_refused_destination_is_reported_as_such() -> None:
    result = _echo_destination(_destination(free_port()), "L3SPOT", 5.0)
    assert result["ok"] is False and result["status"] is None
    assert result["error"] == "cannot connect: connection refused"


def test_a_destination_that_answers_c_echo_is_ok() -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        result = _echo_destination(_destination(port), "L3SPOT", 5.0)
    finally:
        server.shutdown()
    assert result["ok"] is True and result["status"] == "0x0000" and result["error"] is None


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_a_silent_destination_does_not_delay_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS that accepts TCP but never answers: node_started at once, the C-ECHO later."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    cfg = Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "spool"},
            "export": {
                "destinations": [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": silent.getsockname()[1]}
                ]
            },
            "logging": {"startup_echo_timeout_seconds": 2.0},
        }
    )
    setup_logging("INFO")
    try:
        started = time.monotonic()
        thread = log_node_started(cfg, None, 11112, None)
        returned_after = time.monotonic() - started
        assert isinstance(thread, threading.Thread)
        thread.join(30)
    finally:
        silent.close()
    assert returned_after < 1.0  # the C-ECHO waits up to 2 s in its own thread
    lines = _json_lines(capsys.readouterr().out)
    events = [line["event"] for line in lines if str(line["logger"]) == "service.startup"]
    assert events == ["node_started", "destination_echo"]
    echo = next(line for line in lines if line["event"] == "destination_echo")
    assert echo["ok"] is False and echo["level"] == "WARNING" and echo["error"]


def test_no_destination_or_a_zero_timeout_means_no_c_echo(tmp_path: Path) -> None:
    cfg = Config.model_validate({"node": {"spool_dir": tmp_path / "spool"}})
    setup_logging("WARNING")
    assert log_node_started(cfg) is None
    cfg.export.destinations = [_destination(104)]
    cfg.logging.startup_echo_timeout_seconds = 0
    assert log_node_started(cfg) is None


def test_a_spool_that_cannot_be_created_is_named_with_its_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = Config.model_validate({"node": {"spool_dir": tmp_path / "file" / "spool"}})
    with pytest.raises(StartupError, match=r"^node\.spool_dir .*/file/spool: cannot create: "):
        check_folders(cfg)


def test_a_folder_without_write_permission_is_named(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o500)
    cfg = Config.model_validate({"node": {"spool_dir": spool}})
    try:
        with pytest.raises(
            StartupError, match="node.spool_dir .*: cannot write: permission denied"
        ):
            check_folders(cfg)
    finally:
        spool.chmod(0o700)


def test_a_busy_port_names_the_address() -> None:
    import errno

    exc = OSError(errno.EADDRINUSE, "Address already in use")
    text = str(listen_error("node.host, node.port", "0.0.0.0", 11112, exc))
    assert text == "cannot listen on 0.0.0.0:11112 (node.host, node.port): address already in use"


def test_the_celery_patch_still_attaches() -> None:
    """Celery's shutdown handler prints through ``celery.apps.worker.safe_say``: the one
    function :mod:`worker.celery_logs` replaces. Fails when Celery stops doing so."""
    import celery.apps.worker as celery_worker

    assert callable(celery_worker.safe_say)
    assert "safe_say(" in inspect.getsource(celery_worker._shutdown_handler)


def test_celery_output_is_routed_to_the_json_handler(capfd: pytest.CaptureFixture[str]) -> None:
    import celery.apps.worker as celery_worker
    from celery import signals
    from celery.utils.log import get_multiprocessing_logger

    from worker.celery_logs import _setup_logging_receiver, route_celery_output

    original = celery_worker.safe_say
    try:
        route_celery_output("INFO", True)
        signals.setup_logging.send(sender=None, loglevel=logging.INFO)  # as Celery does
        assert get_multiprocessing_logger().propagate
        celery_worker.safe_say("worker: Warm shutdown (MainProcess)", None)
        logging.getLogger("celery.worker").info("celery@host ready.")
    finally:
        celery_worker.safe_say = original
        signals.setup_logging.disconnect(_setup_logging_receiver)
    out, err = capfd.readouterr()
    assert err == ""
    events = [line["event"] for line in _json_lines(out)]
    assert events == ["worker: Warm shutdown (MainProcess)", "celery@host ready."]
