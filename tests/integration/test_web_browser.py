"""The web page in a real headless browser after a real end-to-end run.

``l3spot serve`` (embedded broker, its own workers, ``web.enabled``) receives a small
phantom CT from dcmtk's ``storescu`` (calling AE ``SCANNER``), analyses it, and the page is
driven by Debian's Chromium through selenium + chromedriver: the job list shows the series,
the job page shows both pictures (checked decoded: ``naturalWidth > 0``), and the retry
button re-queues the analysis, which runs again (attempts 1 -> 2).

Screenshots go to ``$L3SPOT_SCREENSHOTS`` when set (else the test's temporary folder).
Helpers and the ``browser`` fixture: tests/support/browser.py, tests/integration/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from core.config import load_config
from core.jobs import JobState, JobStore
from tests.support.browser import (
    STORESCU,
    require_browser,
    section_shot,
    serve,
    shot,
    wait_note,
    wait_record,
)

pytestmark = pytest.mark.integration


def test_browser_lists_the_received_series_shows_its_pictures_and_retries_it(
    tmp_path: Path,
    phantom_series,
    browser,  # noqa: ANN001
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    require_browser()
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
        shot(browser, shots, "web_jobs.png")

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
        shot(browser, shots, "web_job.png", full_height=True)

        browser.find_element(By.ID, "retry").click()
        wait.until(ec.presence_of_element_located((By.ID, "requeued")))
        assert "Analysis re-queued." in browser.find_element(By.ID, "requeued").text
        assert browser.find_element(By.ID, "job-state").text in ("queued", "analysing", "done")
        shot(browser, shots, "web_job_requeued.png")
        rec = wait_record(store, uid, 90, attempts=2)  # as long as the first analysis
        assert rec.state == JobState.DONE and rec.attempts == 2
        browser.refresh()
        wait.until(ec.presence_of_element_located((By.ID, "job-state")))
        assert browser.find_element(By.ID, "job-state").text == "done"
        assert browser.find_element(By.ID, "attempts").text == "2"


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

    require_browser()
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
        shot(browser, shots, "review_viewer.png", full_height=True)
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
        section_shot(browser, "review", shots / "review_scrolled.png")

        browser.find_element(By.ID, "review-correct").click()
        wait.until(ec.presence_of_element_located((By.ID, "reviewed")))
        assert "Correction recorded" in browser.find_element(By.ID, "reviewed").text
        rec = wait_note(store, uid, "corrected", 90)
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
        shot(browser, shots, "review_accepted.png", full_height=True)
        section_shot(browser, "review", shots / "review_reviews.png")

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
