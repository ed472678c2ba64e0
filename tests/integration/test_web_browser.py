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


def _section_shot(driver, element_id: str, path: Path) -> None:  # noqa: ANN001
    """A screenshot of one element of the page, whole (the window made as tall as the page)."""
    from selenium.webdriver.common.by import By

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 6000))
    time.sleep(0.3)  # the new size's layout
    driver.find_element(By.ID, element_id).screenshot(str(path))
    driver.set_window_size(1400, 1000)


def _wait_note(store: JobStore, uid: str, word: str, timeout_s: float) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = store.get(uid)
        if rec.state in (JobState.DONE, JobState.FAILED) and word in (rec.note or ""):
            return rec
        time.sleep(0.2)
    raise AssertionError(f"series {uid}: no {word!r} note in {timeout_s} s ({store.get(uid)})")


def test_browser_scrolls_the_slices_corrects_l3_and_accepts_the_remeasured_result(
    tmp_path: Path,
    phantom_series,
    browser,  # noqa: ANN001
) -> None:
    """Issue 17, review and correct: a reader scrolls two slices up from l3spot's L3, turns
    the window to bone and back, chooses that slice as L3; the node's worker measures again
    there (a verified SR naming the superseded one); the reader accepts the new result, then
    rejects it through the confirmation dialog (dismissed once: nothing recorded)."""
    import pydicom
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from core.layout import RESULT_JSON, SR_FILE, version_dirs
    from core.result import AnalysisResult

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
        results = load_config(config_path).node.resolved_results_dir() / uid
        first = AnalysisResult.model_validate_json((results / RESULT_JSON).read_text())
        l3 = first.l3.slice_index
        assert l3 is not None

        browser.get(f"http://127.0.0.1:{web_port}/jobs/{uid}")
        wait = WebDriverWait(browser, 15)
        img_ok = (
            "const e = document.getElementById('slice-img');"
            " return e.complete ? [e.naturalWidth, +e.dataset.index] : [0, -1];"
        )
        wait.until(lambda d: d.execute_script(img_ok)[0] > 0)
        assert browser.execute_script(img_ok)[1] == l3
        _shot(browser, shots, "review_viewer.png", full_height=True)
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.ARROW_UP)
        body.send_keys(Keys.ARROW_UP)
        wait.until(lambda d: d.execute_script(img_ok)[1] == l3 + 2)
        assert "+2 from L3" in browser.find_element(By.ID, "slice-caption").text
        Select(browser.find_element(By.ID, "slice-window")).select_by_value("bone")
        assert "window=bone" in browser.find_element(By.ID, "slice-img").get_attribute("src")
        Select(browser.find_element(By.ID, "slice-window")).select_by_value("soft")
        wait.until(lambda d: d.execute_script(img_ok)[0] > 0)
        assert browser.find_element(By.ID, "review-slice").get_attribute("value") == str(l3 + 2)
        _section_shot(browser, "review", shots / "review_scrolled.png")

        browser.find_element(By.ID, "review-correct").click()
        wait.until(ec.presence_of_element_located((By.ID, "reviewed")))
        assert "Correction recorded" in browser.find_element(By.ID, "reviewed").text
        rec = _wait_note(store, uid, "corrected", 90)
        assert rec.state == JobState.DONE, rec.reason
        second = AnalysisResult.model_validate_json((results / RESULT_JSON).read_text())
        assert second.l3.slice_index == l3 + 2
        sr = pydicom.dcmread(results / SR_FILE, stop_before_pixels=True)
        assert sr.VerificationFlag == "VERIFIED"
        (v1,) = version_dirs(results)
        old = pydicom.dcmread(v1 / SR_FILE, stop_before_pixels=True)
        pred = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID

        browser.get(f"http://127.0.0.1:{web_port}/jobs/{uid}")
        wait.until(lambda d: d.execute_script(img_ok)[0] > 0)
        assert browser.execute_script(img_ok)[1] == l3 + 2  # the viewer opens at the new L3
        assert "chosen by anonymous" in browser.find_element(By.ID, "l3-corrected").text
        browser.find_element(By.ID, "review-accept").click()
        wait.until(ec.presence_of_element_located((By.ID, "reviewed")))
        assert "Result accepted." in browser.find_element(By.ID, "reviewed").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#reviews tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == [
            "correct",
            "accept",
        ]
        _shot(browser, shots, "review_accepted.png", full_height=True)
        _section_shot(browser, "review", shots / "review_reviews.png")

        # reject: a confirmation dialog guards it; dismissed, nothing is recorded
        browser.find_element(By.ID, "review-reject").click()
        wait.until(ec.alert_is_present())
        browser.switch_to.alert.dismiss()
        assert len(store.reviews(uid)) == 2
        browser.find_element(By.ID, "review-reject").click()
        wait.until(ec.alert_is_present())
        browser.switch_to.alert.accept()
        wait.until(ec.text_to_be_present_in_element((By.ID, "reviewed"), "Rejection recorded"))
        assert "L3 rejected by a reader" in browser.page_source
        assert store.get(uid).state == JobState.DONE  # nothing measured again
    reviews = store.reviews(uid)
    assert [(r.action, r.slice_index, r.previous_slice_index) for r in reviews] == [
        ("correct", l3 + 2, l3),
        ("accept", l3 + 2, l3 + 2),
        ("reject", None, l3 + 2),
    ]
