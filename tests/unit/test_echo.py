"""C-ECHO SCU (:mod:`core.echo`) and ``l3spot echo``: each outcome against a real peer."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.echo import EchoOutcome, echo_scp
from l3spot import app
from tests.support.node import free_port, verification_scp


@pytest.fixture(scope="module")
def pacs_port() -> Iterator[int]:
    with verification_scp("PACS") as port:
        yield port


def test_success_has_the_round_trip_time(pacs_port: int) -> None:
    r = echo_scp("127.0.0.1", pacs_port, "PACS", "L3SPOT", timeout_s=5)
    assert r.ok and r.outcome is EchoOutcome.SUCCESS and r.status == 0
    assert r.rtt_ms is not None and 0 < r.rtt_ms < 5000
    assert r.as_dict()["outcome"] == "success" and r.at <= time.time()


def test_wrong_called_ae_title_is_a_rejection_with_its_reason(pacs_port: int) -> None:
    r = echo_scp("127.0.0.1", pacs_port, "NOT_PACS", "L3SPOT", timeout_s=5)
    assert r.outcome is EchoOutcome.REJECTED and not r.ok
    assert "Called AE title not recognised" in r.detail and r.rtt_ms is None


def test_closed_port_is_connection_refused() -> None:
    r = echo_scp("127.0.0.1", free_port(), "PACS", timeout_s=5)
    assert r.outcome is EchoOutcome.REFUSED and not r.ok


def test_unknown_host_name_says_so() -> None:
    r = echo_scp("no-such-host.invalid", 104, "PACS", timeout_s=2)
    assert r.outcome is EchoOutcome.UNKNOWN_HOST


def test_a_peer_that_accepts_tcp_but_never_answers_is_a_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        r = echo_scp("127.0.0.1", listener.getsockname()[1], "PACS", timeout_s=1)
    assert r.outcome is EchoOutcome.TIMEOUT


def test_a_peer_that_closes_the_connection_is_an_abort() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def close_each() -> None:
            conn, _ = listener.accept()
            conn.close()

        t = threading.Thread(target=close_each, daemon=True)
        t.start()
        r = echo_scp("127.0.0.1", listener.getsockname()[1], "PACS", timeout_s=5)
        t.join(5)
    assert r.outcome is EchoOutcome.ABORTED


def test_l3spot_echo_uses_it_exit_0_on_success_1_with_the_outcome(
    pacs_port: int, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"ae_title": "PACS", "port": pacs_port}}))
    runner = CliRunner()
    ok = runner.invoke(app, ["echo", "--config", str(cfg)])
    assert ok.exit_code == 0 and "success" in ok.output, ok.output
    refused = runner.invoke(app, ["echo", "--config", str(cfg), "--port", str(free_port())])
    assert refused.exit_code == 1 and "connection refused" in refused.output
    wrong = runner.invoke(app, ["echo", "--config", str(cfg), "--called-ae", "OTHER"])
    assert wrong.exit_code == 1 and "association rejected" in wrong.output
