"""The whole learning loop of issue 17, end to end, with phantoms playing a site's patients.

A *site* whose patients differ from the locator's training phantoms (``PhantomSpec.site =
"short_flank"``: the pelvis higher on the spine and long lower ribs reaching towards it, the
short costo-iliac distance of osteoporotic height loss) sends its CT to ``l3spot serve``
(``storescu``); the shipped locator misses L3 or picks the wrong level on a good share of
them. A reader reviews every result on the job page in Chromium: accepts the right ones,
chooses the true L3 slice for the others (also where l3spot said "not in the field of
view"). ``l3spot train --from-reviews`` then fine-tunes the locator on those reviews, with
phantoms mixed in, evaluates it on held-out reviewed scans and the phantom benchmark, and
promotes it. The promoted version is measured on the site's *new* patients, never reviewed:
it must be right more often and closer than the shipped one. The node's next analysis names
the new version in result.json and the SR; ``l3spot models rollback`` returns to the shipped
models.

Several minutes on 2 cores (4.7-5.6 min measured with a training job beside it; the training
is two passes of 200 steps): marked slow. The run is reproducible: the site secret that
splits the reviewed patients is fixed, 24 default phantoms are mixed in, and the phantom
benchmark has the command's default 40 scans (with 6, one scan decided the promotion).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from core.config import load_config
from core.jobs import JobState, JobStore
from core.layout import RESULT_JSON, SR_FILE
from core.result import AnalysisResult
from tests.support.browser import (
    STORESCU,
    require_browser,
    section_shot,
    serve,
    wait_note,
    wait_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITE = "short_flank"
#: Scans the reader reviews (the site's data), and the site's new patients (never reviewed).
REVIEWED = range(950_000, 950_024)
NEW_PATIENTS = range(960_000, 960_012)
AFTER_PROMOTION = 960_100
FOVS = ("abdomen_pelvis", "chest_abdomen_pelvis", "abdomen")
SLICE_MM = 5.0


def _spec(seed: int):  # noqa: ANN202 (worker.phantom.PhantomSpec)
    from worker.phantom import PhantomSpec

    return PhantomSpec(
        fov=FOVS[seed % len(FOVS)],
        rows=128,
        cols=128,
        pixel_spacing_mm=3.0,
        slice_thickness_mm=SLICE_MM,
        with_labels=False,
        site=SITE,
    )


def _write_site(folder: Path, seeds: range) -> dict[str, int | None]:
    """Each seed's DICOM series under ``folder``; Series Instance UID -> true L3 slice."""
    from worker.phantom import generate_phantom, write_phantom

    truth: dict[str, int | None] = {}
    for seed in seeds:
        ph = generate_phantom(seed, _spec(seed))
        write_phantom(ph, folder / str(seed), fmt="dicom")
        gt = json.loads((folder / str(seed) / "ground_truth.json").read_text())
        truth[gt["series_instance_uid"]] = ph.truth.l3_mid_slice_index
    return truth


def _store(port: int, dirs: list[Path]) -> None:
    sent = subprocess.run(
        [STORESCU, "-aet", "SCANNER", "-aec", "L3SPOT", "127.0.0.1", str(port)]
        + ["+sd", "+sp", "*.dcm", *map(str, dirs)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=300,
    )
    assert sent.returncode == 0, sent.stderr


def _l3spot(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3SPOT__")}
    return subprocess.run(
        [sys.executable, "-m", "l3spot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_reviews_through_the_page_teach_the_locator_a_site_it_did_not_know(
    tmp_path: Path,
    browser,  # noqa: ANN001
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from core.model_registry import SHIPPED, ModelRegistry
    from worker.phantom import generate_phantom_mips
    from worker.training.from_reviews import EvalCase, evaluate_version

    require_browser()
    shots = Path(os.environ.get("L3SPOT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    site = tmp_path / "site"
    truth = _write_site(site, REVIEWED)
    # the site secret keys the patient groups, and so which reviewed scans are held out: a
    # fixed one makes the split, and with it the run, the same every time (a fresh random
    # secret gave a different split on each run, and some splits were not promoted)
    spool = tmp_path / "var" / "spool"
    spool.mkdir(parents=True)
    (spool / "patient.key").write_text(hashlib.sha256(b"l3spot learning-loop test").hexdigest())
    # the loop teaches the first-stage locator. Counting the vertebrae where it refuses (on
    # by default since 2026-12-07) already answers part of this site's refusals; it is off
    # here so that the reviews see what the shipped first stage misses
    with serve(tmp_path, locator={"count_when_absent": False}) as (
        config_path,
        dicom_port,
        web_port,
    ):
        config = load_config(config_path)
        results = config.node.resolved_results_dir()
        _store(dicom_port, [site / str(s) / "dicom" for s in REVIEWED])
        store = JobStore(config.node.spool_dir)
        for uid in truth:
            rec = wait_record(store, uid, 300)
            assert rec.state == JobState.DONE, rec.reason

        # --- the reader reviews every result on its page
        wait = WebDriverWait(browser, 15)
        shown = (
            "const e = document.getElementById('slice-img');"
            " return e.complete && e.naturalWidth > 0 ? +e.dataset.index : -1;"
        )
        before: dict[str, int | None] = {}
        corrected = []
        for uid, true_index in truth.items():
            assert true_index is not None  # these fields of view hold L3
            result = AnalysisResult.model_validate_json((results / uid / RESULT_JSON).read_text())
            assert result.algorithm.locator_model.startswith(SHIPPED)
            found = result.l3.slice_index
            before[uid] = found
            browser.get(f"http://127.0.0.1:{web_port}/jobs/{uid}")
            wait.until(ec.presence_of_element_located((By.ID, "review-accept")))
            if found is not None and abs(found - true_index) <= 1:
                browser.find_element(By.ID, "review-accept").click()
                wait.until(ec.text_to_be_present_in_element((By.ID, "reviewed"), "accepted"))
                continue
            field = browser.find_element(By.ID, "review-slice")
            # as a reader types it: select the number, type the slice, leave the field (the
            # viewer then shows that slice)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(true_index), Keys.TAB)
            wait.until(lambda d, i=true_index: d.execute_script(shown) == i)
            if found is None and not corrected:
                section_shot(browser, "review", shots / "learning_correct_missed_l3.png")
            browser.find_element(By.ID, "review-correct").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "reviewed"), "Correction"))
            corrected.append(uid)
        missed = [u for u, f in before.items() if f is None]
        wrong = [u for u, f in before.items() if f is not None and abs(f - truth[u]) > 1]
        # the site is one the shipped locator does not know
        assert len(missed) + len(wrong) >= 4, (missed, wrong)
        for uid in corrected:
            rec = wait_note(store, uid, "corrected", 120)
            assert rec.state == JobState.DONE, rec.reason
            fixed = AnalysisResult.model_validate_json((results / uid / RESULT_JSON).read_text())
            assert fixed.l3.slice_index == truth[uid]
        assert len(store.reviews()) == len(truth)

        # --- the locator learns from them
        run = _l3spot(
            "train",
            "--from-reviews",
            "--config",
            str(config_path),
            "--steps-per-epoch",
            "200",
            "--phantoms",
            "24",
            "--bench-phantoms",
            "40",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--threads",
            "2",
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "site-0001: promoted" in run.stdout, run.stdout
        registry = ModelRegistry.from_config(config)
        assert registry.state()["active"] == "site-0001"
        evaluation = registry.get("site-0001").evaluation
        held = evaluation["site_held_out"]
        assert held["candidate"]["right"] > held["active"]["right"] or (
            held["candidate"]["right"] == held["active"]["right"]
            and held["candidate"]["mean_abs_mm"] < held["active"]["mean_abs_mm"]
        )
        record = registry.get("site-0001").record
        assert not set(record["site_training_series"]) & set(held["series"])

        # --- the site's new patients, never reviewed: the promoted version does better
        new = []
        for seed in NEW_PATIENTS:
            pms = generate_phantom_mips(seed, _spec(seed), (3.0, 1.0))
            t = pms[0].truth
            new.append(
                EvalCase(str(seed), [p.mip for p in pms], t.l3_mid_z_mm if t.l3_in_fov else None)
            )
        promoted = evaluate_version(registry.get("site-0001"), new, config)
        shipped = evaluate_version(registry.get(SHIPPED), new, config)
        gain = {
            "right": (shipped.right, promoted.right),
            "mean_abs_mm": (shipped.mean_abs_mm, promoted.mean_abs_mm),
        }
        print(f"new site patients (shipped -> promoted): {gain}")
        assert promoted.right >= shipped.right, gain
        assert promoted.mean_abs_mm < shipped.mean_abs_mm - 3.0, gain

        # --- the next analysis uses, and names, the promoted version
        _write_site(tmp_path / "later", range(AFTER_PROMOTION, AFTER_PROMOTION + 1))
        _store(dicom_port, [tmp_path / "later" / str(AFTER_PROMOTION) / "dicom"])
        later = next(r.series_uid for r in store.list() if r.series_uid not in truth)
        rec = wait_record(store, later, 120)
        assert rec.state == JobState.DONE, rec.reason
        result = AnalysisResult.model_validate_json((results / later / RESULT_JSON).read_text())
        assert result.algorithm.locator_model == "site-0001"
        sr = pydicom.dcmread(results / later / SR_FILE, stop_before_pixels=True)
        assert "locator site-0001" in list(sr.SoftwareVersions)
        browser.get(f"http://127.0.0.1:{web_port}/jobs/{later}")
        assert browser.find_element(By.ID, "locator-version").text == "site-0001"

        # --- and a promotion can be rolled back
        back = _l3spot("models", "rollback", "--config", str(config_path), timeout=60)
        assert back.returncode == 0, back.stdout + back.stderr
        assert registry.state()["active"] == SHIPPED
