"""The web page in a real headless browser after a real end-to-end run.

``l3spot serve`` (embedded broker, its own workers, ``web.enabled``) receives a small
phantom CT from dcmtk's ``storescu`` (calling AE ``SCANNER``), analyses it, and the page is
driven by Debian's Chromium through selenium + chromedriver: the job list shows the series,
the job page shows both pictures (checked decoded: ``naturalWidth > 0``), and the retry
button re-queues the analysis, which runs again (attempts 1 -> 2).

Screenshots go to ``$L3SPOT_SCREENSHOTS`` when set (else the test's temporary folder).
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

import pytest
import yaml

from core.config import load_config
from core.jobs import JobNotFoundError, JobRecord, JobState, JobStore
from tests.conftest import require_shipped
from tests.support.node import free_port

pytestmark = pytest.mark.integration

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


def _require() -> None:
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
def serve(tmp: Path) -> Iterator[tuple[Path, int, int]]:
    """``l3spot serve --web``; yields (config path, DICOM port, web port)."""
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


@pytest.fixture()
def browser(tmp_path: Path):  # noqa: ANN201 (selenium WebDriver)
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


def _shot(driver, folder: Path, name: str, full_height: bool = False) -> Path:  # noqa: ANN001
    if full_height:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(int(height) + 40, 6000))
    path = folder / name
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def test_browser_lists_the_received_series_shows_its_pictures_and_retries_it(
    tmp_path: Path,
    phantom_series,
    browser,  # noqa: ANN001
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _require()
    series_dir, _ = phantom_series
    shots = Path(os.environ.get("L3SPOT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with serve(tmp_path) as (config_path, dicom_port, web_port):
        sent = subprocess.run(
            [STORESCU, "-aet", "SCANNER", "-aec", "L3SPOT", "127.0.0.1", str(dicom_port)]
            + ["+sd", "+sp", "*.dcm", str(series_dir)],
            capture_output=True,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        store = JobStore(tmp_path / "var" / "spool")
        uid = next(iter(store.list())).series_uid
        rec = wait_record(store, uid, 90)
        assert rec.state == JobState.DONE, rec.reason

        base = f"http://127.0.0.1:{web_port}"
        browser.get(base + "/")
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-series="{uid}"]')
        assert "SCANNER" in row.text and "done" in row.text and "found" in row.text
        _shot(browser, shots, "web_jobs.png")

        row.find_element(By.TAG_NAME, "a").click()
        wait = WebDriverWait(browser, 15)
        wait.until(ec.presence_of_element_located((By.ID, "img-overview")))
        loaded = (
            "return ['img-l3','img-overview'].map(i => {const e = document.getElementById(i);"
            " return e && e.complete ? e.naturalWidth : 0;})"
        )
        wait.until(lambda d: all(w > 0 for w in d.execute_script(loaded)))
        widths = browser.execute_script(loaded)
        assert all(w > 100 for w in widths), widths
        assert browser.find_element(By.ID, "job-state").text == "done"
        assert "Skeletal muscle (SMA)" in browser.page_source
        _shot(browser, shots, "web_job.png", full_height=True)

        browser.find_element(By.ID, "retry").click()
        wait.until(ec.presence_of_element_located((By.ID, "requeued")))
        assert "Analysis re-queued." in browser.find_element(By.ID, "requeued").text
        assert browser.find_element(By.ID, "job-state").text in ("queued", "analysing", "done")
        _shot(browser, shots, "web_job_requeued.png")
        rec = wait_record(store, uid, 60, attempts=2)
        assert rec.state == JobState.DONE and rec.attempts == 2
        browser.refresh()
        wait.until(ec.presence_of_element_located((By.ID, "job-state")))
        assert browser.find_element(By.ID, "job-state").text == "done"
        assert browser.find_element(By.ID, "attempts").text == "2"
