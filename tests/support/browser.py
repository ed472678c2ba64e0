"""Helpers of the browser tests: ``l3spot serve --web`` in a subprocess, Chromium through
selenium, waiting for jobs, screenshots (tests/integration/test_web_browser.py,
tests/integration/test_learning_loop.py).

Install: ``apt-get install chromium chromium-driver`` and ``pip install selenium`` (.ci/run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import load_config
from core.jobs import JobNotFoundError, JobRecord, JobState, JobStore
from tests.conftest import require_shipped
from tests.support.node import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STORESCU = "/usr/bin/storescu"
#: Flags for Chromium on a machine without network or screen (machine docs, python-svc).
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def require_browser() -> None:
    for prog in (CHROMIUM, CHROMEDRIVER, STORESCU):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (apt-get install chromium chromium-driver dcmtk)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install selenium)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT")}
    weights = load_config(environ=env).locator.weights
    require_shipped(weights, "locator weights")


def _scp_up(web_port: int) -> bool:
    """``/healthz`` answers and says the node's SCP is listening (200 or 503 alike)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=2) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    except OSError:
        return False
    return bool(body["checks"]["node"]["ok"])


@contextlib.contextmanager
def serve(tmp: Path, locator: dict[str, Any] | None = None) -> Iterator[tuple[Path, int, int]]:
    """``l3spot serve --web``; yields (config path, DICOM port, web port). ``locator``: settings
    of the config's ``locator`` section for this node (default: none, the shipped ones)."""
    dicom_port, web_port = free_port(), free_port()
    cfg = {
        "node": {
            "ae_title": "L3SPOT",
            "host": "127.0.0.1",
            "port": dicom_port,
            "spool_dir": str(tmp / "var" / "spool"),
            "series_stable_seconds": 1,
            "watcher_interval_seconds": 0.2,
        },
        "broker": {"url": None},
        "export": {"destinations": []},
        "web": {"enabled": False, "host": "127.0.0.1", "port": web_port},  # on by --web
    }
    if locator:
        cfg["locator"] = dict(locator)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT__")}
    log = open(tmp / "node.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "l3spot", "serve", "--web", "--config", str(path)],
        stdout=log,
        stderr=log,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not _scp_up(web_port):  # the page starts just before the SCP listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "node.log").read_text()[-3000:])
            time.sleep(0.3)
        yield path, dicom_port, web_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_record(store: JobStore, uid: str, timeout_s: float, attempts: int = 1) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(JobNotFoundError):
            rec = store.get(uid)
            if (
                rec.state in (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)
                and rec.attempts >= attempts
            ):
                return rec
        time.sleep(0.2)
    raise AssertionError(f"series {uid} not finished (attempts {attempts}) in {timeout_s} s")


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium (selenium WebDriver) with its profile under ``tmp_path``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    opts.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, folder: Path, name: str, full_height: bool = False) -> Path:  # noqa: ANN001
    if full_height:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(int(height) + 40, 6000))
    path = folder / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def section_shot(driver, element_id: str, path: Path) -> None:  # noqa: ANN001
    """A screenshot of one element of the page, whole (the window made as tall as the page)."""
    from selenium.webdriver.common.by import By

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 6000))
    time.sleep(0.3)  # the new size's layout
    driver.find_element(By.ID, element_id).screenshot(str(path))
    driver.set_window_size(1400, 1000)


def wait_note(store: JobStore, uid: str, word: str, timeout_s: float) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = store.get(uid)
        if rec.state in (JobState.DONE, JobState.FAILED) and word in (rec.note or ""):
            return rec
        time.sleep(0.2)
    raise AssertionError(f"series {uid}: no {word!r} note in {timeout_s} s ({store.get(uid)})")
