"""Review and correct on the web page (issue 17): the slice viewer, accept, choose another
slice as L3 (a re-measure task), the re-measure itself (corrected, verified SR; the earlier
result kept) and the records (reviews table, audit log).

The case is the web page's (:func:`tests.unit.test_web.build_case`: one real analysis of a
small phantom); the re-measure runs the real pipeline at the chosen slice.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from celery import Celery
from PIL import Image

from core.config import Config
from core.errors import JobNotFoundError
from core.jobs import JobState, JobStore, ReviewAction
from core.layout import RESULT_JSON, SEG_FILE, SR_FILE, version_dirs
from core.queue import celery_settings
from core.result import AnalysisResult
from service.audit import AuditLog, audit_log_path
from service.web.app import create_app
from service.web.auth import ANONYMOUS, AUTOMATION
from service.web.review import list_slices
from tests.conftest import require_program
from tests.unit.test_web import WebCase, _csrf, _queued_messages, build_case, make_config

#: dciodvfy warnings accepted (as tests/unit/test_outputs_sr.py: l3spot's coding scheme)
ACCEPTED_WARNINGS = ("Unrecognized defined term <99L3SPOT>",)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory, phantom_series) -> WebCase:  # noqa: ANN001
    return build_case(tmp_path_factory.mktemp("review"), phantom_series[0])


@pytest.fixture()
def case(tmp_path: Path, analysed: WebCase) -> WebCase:
    """A private copy of the analysed case (the tests record reviews and queue tasks)."""
    root = tmp_path / "copy"
    shutil.copytree(analysed.root, root)
    with sqlite3.connect(root / "var" / "spool" / "jobs.sqlite") as con:
        con.execute(
            "UPDATE jobs SET series_dir = replace(series_dir, ?, ?)",
            (str(analysed.root), str(root)),
        )
    config = make_config(root)
    return WebCase(
        root,
        config,
        analysed.phantom_uid,
        analysed.phantom_patient,
        analysed.ineligible_uid,
        analysed.failed_uid,
        analysed.result,
    )


def _review_csrf(html: str) -> str:
    """The review forms' token (the page's second and later forms)."""
    return _csrf(html[html.index("review-form") :])


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_job_page_shows_slices_around_l3_in_the_loader_s_order(case: WebCase) -> None:
    c = create_app(case.config).test_client()
    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    assert l3 is not None
    html = c.get(f"/jobs/{uid}").get_data(as_text=True)
    assert 'id="slice-range"' in html and f'value="{l3}"' in html
    assert 'id="review-accept"' in html and 'id="review-correct"' in html
    # the page's slice order is the worker's: the result's L3 image is at the L3 index
    rec = JobStore(case.config.node.spool_dir).get(uid)
    slices = list_slices(Path(rec.series_dir))
    assert slices[l3].sop_instance_uid == case.result.l3.sop_instance_uid
    assert [s.z_mm for s in slices] == sorted(s.z_mm for s in slices)

    soft = c.get(f"/jobs/{uid}/slices/{l3}.png?window=soft")
    bone = c.get(f"/jobs/{uid}/slices/{l3}.png?window=bone")
    masked = c.get(f"/jobs/{uid}/slices/{l3}.png?window=soft&masks=1")
    other = c.get(f"/jobs/{uid}/slices/{l3 + 1}.png?window=soft&masks=1")
    assert {r.status_code for r in (soft, bone, masked, other)} == {200}
    assert soft.mimetype == "image/png"
    s, b, m, o = (_png(r.data) for r in (soft, bone, masked, other))
    assert s.ndim == 2 and o.ndim == 2  # grey: no masks but on the L3 slice
    assert not np.array_equal(s, b)  # the window changes the picture
    assert m.ndim == 3 and m.shape[2] == 3
    # muscle is coloured red-ish where the SEG says SMA
    diff = np.abs(m[..., 0].astype(int) - m[..., 1].astype(int))
    assert int((diff > 40).sum()) > 100
    assert c.get(f"/jobs/{uid}/slices/{len(slices)}.png").status_code == 404
    assert c.get(f"/jobs/{case.ineligible_uid}/slices/99.png").status_code == 404


def test_accept_records_the_review_and_audit_and_queues_nothing(case: WebCase) -> None:
    c = create_app(case.config).test_client()
    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    token = _review_csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))
    resp = c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "accept"})
    assert resp.status_code == 303 and "reviewed=accept" in resp.headers["Location"]
    store = JobStore(case.config.node.spool_dir)
    (review,) = store.reviews(uid)
    assert review.action == ReviewAction.ACCEPT and review.slice_index == l3
    assert review.previous_slice_index == l3 and review.user_name == ANONYMOUS
    # the locator version of the result reviewed (decisions per model version, issue 17)
    assert review.model_version == case.result.algorithm.locator_model
    assert review.model_version.startswith("shipped (")
    assert store.get(uid).state == JobState.DONE
    assert _queued_messages(case.config) == []
    (line,) = [r for r in AuditLog(audit_log_path(case.config)).read() if r["event"] == "review"]
    assert line["review_action"] == "accept" and line["user"] == ANONYMOUS
    assert line["series_instance_uid"] == uid and line["slice_index"] == l3
    page = c.get(resp.headers["Location"]).get_data(as_text=True)
    assert "Result accepted." in page and 'id="reviews"' in page


def _own_celery(config: Config) -> Celery:
    """A Celery app of its own for ``config``: the shared :data:`core.queue.app` keeps the
    first broker folder it sent to (its producer pool), which other test modules rely on."""
    app = Celery("l3spot-test", set_as_current=False)
    app.conf.update(celery_settings(config))
    return app


def test_correct_queues_a_remeasure_at_the_chosen_slice(case: WebCase) -> None:
    c = create_app(case.config, celery=_own_celery(case.config)).test_client()
    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    assert l3 is not None
    token = _review_csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))
    resp = c.post(
        f"/jobs/{uid}/review",
        data={"csrf": token, "action": "correct", "slice": str(l3 + 2)},
        headers={"Origin": "http://localhost"},
    )
    assert resp.status_code == 303 and "reviewed=correct" in resp.headers["Location"]
    store = JobStore(case.config.node.spool_dir)
    (review,) = store.reviews(uid)
    assert review.action == ReviewAction.CORRECT
    assert (review.slice_index, review.previous_slice_index) == (l3 + 2, l3)
    assert review.z_mm is not None and review.z_mm > (review.previous_z_mm or 0) - 1
    rec = store.get(uid)
    assert rec.state == JobState.QUEUED
    (msg,) = _queued_messages(case.config)
    assert msg["headers"]["task"] == "worker.tasks.remeasure_series"
    args, kwargs, _ = json.loads(base64.b64decode(msg["body"]))
    assert args[1:] == [review.id, l3 + 2] and Path(args[0]).name == uid
    assert kwargs == {"token": rec.token}


def test_review_refuses_missing_csrf_other_origins_and_slices_off_the_viewer(
    case: WebCase,
) -> None:
    c = create_app(case.config).test_client()
    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    assert l3 is not None
    html = c.get(f"/jobs/{uid}").get_data(as_text=True)
    token = _review_csrf(html)
    retry_token = _csrf(html)  # the retry form's token is not the review form's
    assert retry_token != token
    form = {"action": "correct", "slice": str(l3 + 1)}
    assert c.post(f"/jobs/{uid}/review", data=form).status_code == 403
    assert c.post(f"/jobs/{uid}/review", data={**form, "csrf": retry_token}).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert (
        c.post(f"/jobs/{uid}/review", data={**form, "csrf": token}, headers=evil).status_code == 403
    )
    far = {"csrf": token, "action": "correct", "slice": str(l3 + 16)}
    resp = c.post(f"/jobs/{uid}/review", data=far)
    assert resp.status_code == 303 and "review_error" in resp.headers["Location"]
    assert c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "x"}).status_code == 400
    assert JobStore(case.config.node.spool_dir).reviews(uid) == []
    assert _queued_messages(case.config) == []


def test_the_reviewer_is_the_signed_in_user_or_the_automation_token(case: WebCase) -> None:
    from service.users import Role, add_user

    config = make_config(case.root, token="s3cret", auth="users")
    add_user(JobStore(config.node.spool_dir), "dr.ana", Role.READER, "a long reader password")
    c = create_app(config).test_client()
    uid = case.phantom_uid
    basic = {
        "Authorization": "Basic " + base64.b64encode(b"dr.ana:a long reader password").decode()
    }
    token = _review_csrf(c.get(f"/jobs/{uid}", headers=basic).get_data(as_text=True))
    c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "accept"}, headers=basic)
    bearer = {"Authorization": "Bearer s3cret"}
    c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "accept"}, headers=bearer)
    users = [r.user_name for r in JobStore(config.node.spool_dir).reviews(uid)]
    assert users == ["dr.ana", AUTOMATION]
    anonymous = c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "accept"})
    assert anonymous.status_code == 401  # named users configured: nobody else decides


def _dciodvfy_problems(path: Path) -> tuple[list[str], list[str]]:
    exe = require_program("dciodvfy")
    lines = subprocess.run([exe, str(path)], capture_output=True, text=True).stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, [w for w in warnings if not any(a in w for a in ACCEPTED_WARNINGS)]


def test_remeasure_writes_a_verified_corrected_sr_and_keeps_the_earlier_result(
    case: WebCase,
) -> None:
    from worker.tasks import run_remeasure

    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    assert l3 is not None
    chosen = l3 + 2
    store = JobStore(case.config.node.spool_dir)
    results = case.config.node.resolved_results_dir() / uid
    old_sr = pydicom.dcmread(results / SR_FILE)
    old_seg = pydicom.dcmread(results / SEG_FILE, stop_before_pixels=True)
    review = store.add_review(uid, "correct", "dr.ana", slice_index=chosen, previous_slice_index=l3)
    token = store.mark_queued(uid)
    sent: list[tuple[str, str | None]] = []
    rec = store.get(uid)
    state = run_remeasure(
        Path(rec.series_dir),
        review.id,
        chosen,
        case.config,
        store,
        lambda u, t: sent.append((u, t)),
        token=token,
    )
    assert state == JobState.EXPORTING and sent == [(uid, token)]
    assert "corrected" in (store.get(uid).note or "")
    page = create_app(case.config).test_client().get(f"/jobs/{uid}").get_data(as_text=True)
    assert 'id="l3-corrected"' in page and "chosen by dr.ana" in page
    assert f'value="{chosen}"' in page  # the viewer opens at the corrected L3
    result = AnalysisResult.model_validate_json((results / RESULT_JSON).read_text())
    assert result.l3.slice_index == chosen and result.composition
    assert result.composition["sma"].area_cm2 != case.result.composition["sma"].area_cm2

    sr = pydicom.dcmread(results / SR_FILE)
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE"
    (obs,) = sr.VerifyingObserverSequence
    assert obs.VerifyingObserverName.family_name == "dr.ana"
    assert obs.VerifyingOrganization == case.config.web.review_organisation
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert series.SeriesInstanceUID == old_sr.SeriesInstanceUID
    # a new document in the same series; the SEG too, and the SR references the new SEG
    assert sr.SOPInstanceUID != old_sr.SOPInstanceUID
    assert sr.SeriesInstanceUID == old_sr.SeriesInstanceUID
    seg = pydicom.dcmread(results / SEG_FILE, stop_before_pixels=True)
    assert seg.SOPInstanceUID != old_seg.SOPInstanceUID
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and old_seg.SOPInstanceUID not in evidence
    # the earlier result is kept, unchanged
    (v1,) = version_dirs(results)
    assert v1.name == "v1"
    assert pydicom.dcmread(v1 / SR_FILE).SOPInstanceUID == old_sr.SOPInstanceUID
    assert (v1 / RESULT_JSON).is_file()

    # dciodvfy: no error, and no warning the earlier (unverified) SR did not have (the
    # phantom's study lacks Study Time and Study ID: both SRs copy that)
    errors, warnings = _dciodvfy_problems(results / SR_FILE)
    _, before = _dciodvfy_problems(v1 / SR_FILE)
    assert errors == [] and set(warnings) <= set(before), errors + warnings

    # a second correction keeps both earlier versions
    review2 = store.add_review(uid, "correct", "dr.bo", slice_index=l3, previous_slice_index=chosen)
    token = store.mark_queued(uid)
    run_remeasure(
        Path(rec.series_dir), review2.id, l3, case.config, store, lambda u, t: None, token
    )
    assert [p.name for p in version_dirs(results)] == ["v1", "v2"]
    sr2 = pydicom.dcmread(results / SR_FILE)
    ref2 = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref2.ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert sr2.SOPInstanceUID not in (sr.SOPInstanceUID, old_sr.SOPInstanceUID)


def test_a_failed_remeasure_leaves_the_earlier_result_and_says_why(case: WebCase) -> None:
    from worker.tasks import run_remeasure

    uid = case.phantom_uid
    store = JobStore(case.config.node.spool_dir)
    results = case.config.node.resolved_results_dir() / uid
    before = (results / SR_FILE).read_bytes()
    review = store.add_review(uid, "correct", "dr.ana", slice_index=10_000)
    token = store.mark_queued(uid)
    rec = store.get(uid)
    state = run_remeasure(
        Path(rec.series_dir), review.id, 10_000, case.config, store, lambda u, t: None, token
    )
    assert state == JobState.FAILED
    assert "slice 10000" in (store.get(uid).reason or "")
    assert (results / SR_FILE).read_bytes() == before and version_dirs(results) == []


def test_the_pipeline_at_a_forced_slice_measures_that_slice_without_the_locator(
    case: WebCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.pipeline as pipeline

    def no_locator(*args: object, **kwargs: object) -> None:
        raise AssertionError("the locator ran although the slice was given")

    monkeypatch.setattr(pipeline, "locate_l3", no_locator)
    l3 = case.result.l3.slice_index
    assert l3 is not None
    rec = JobStore(case.config.node.spool_dir).get(case.phantom_uid)
    result = pipeline.analyze_series(
        Path(rec.series_dir), tmp_path / "out", case.config, l3_slice_index=l3 - 1
    )
    assert result.l3.slice_index == l3 - 1 and result.l3.in_field_of_view
    assert result.l3.confidence == 1.0 and result.composition
    slices = list_slices(Path(rec.series_dir))
    assert result.l3.sop_instance_uid == slices[l3 - 1].sop_instance_uid
    # not a correction: the objects keep the analysis's UIDs, the SR is unverified
    sr = pydicom.dcmread(tmp_path / "out" / SR_FILE, stop_before_pixels=True)
    assert sr.VerificationFlag == "UNVERIFIED"


def test_a_store_of_the_previous_schema_gets_the_reviews_table(tmp_path: Path) -> None:
    from core.jobs import SCHEMA_VERSION

    spool = tmp_path / "spool"
    store = JobStore(spool)
    store.mark_received("1.2.3", "1.2", spool / "1.2" / "1.2.3")
    with sqlite3.connect(spool / "jobs.sqlite") as con:  # as the release before issue 17
        con.execute("DROP TABLE reviews")
        con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION - 1,))
    store = JobStore(spool)
    review = store.add_review("1.2.3", "accept", "dr.ana", slice_index=4)
    assert store.review(review.id) == review and store.reviews("1.2.3") == [review]
    with pytest.raises(JobNotFoundError):
        store.add_review("4.5.6", "accept", "dr.ana")


def test_a_new_analysis_after_a_correction_keeps_every_version(case: WebCase) -> None:
    from worker.tasks import run_analysis, run_remeasure

    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    assert l3 is not None
    store = JobStore(case.config.node.spool_dir)
    results = case.config.node.resolved_results_dir() / uid
    series_dir = Path(store.get(uid).series_dir)
    review = store.add_review(uid, "correct", "dr.ana", slice_index=l3 + 1)
    token = store.mark_queued(uid)
    run_remeasure(series_dir, review.id, l3 + 1, case.config, store, lambda u, t: None, token)
    corrected = pydicom.dcmread(results / SR_FILE).SOPInstanceUID

    def new_result(src: Path, out: Path, config: Config) -> dict:
        (out / RESULT_JSON).write_text("{}")
        return {}

    token = store.mark_queued(uid)  # "Analyse again" / l3spot retry --analysis
    run_analysis(series_dir, case.config, store, lambda u, t: None, token, pipeline=new_result)
    assert [p.name for p in version_dirs(results)] == ["v1", "v2"]
    assert pydicom.dcmread(results / "v2" / SR_FILE).SOPInstanceUID == corrected
    assert not (results / SR_FILE).exists()  # the new analysis's files only, at the top


def test_decisions_are_exported_as_csv_and_metrics_per_model_version(case: WebCase) -> None:
    """Issue 17, post-market monitoring: acceptance rate and correction distances per model
    version in /reviews.csv and /metrics; a series corrected then accepted counts as
    corrected once."""
    from core.jobs import ReviewAction
    from core.review_stats import review_summary

    store = JobStore(case.config.node.spool_dir)
    uid = case.phantom_uid
    store.add_review(
        uid,
        ReviewAction.CORRECT,
        "dr.ana",
        slice_index=12,
        z_mm=-140.0,
        previous_slice_index=10,
        previous_z_mm=-150.0,
        model_version="m1",
    )
    store.add_review(
        uid,
        ReviewAction.ACCEPT,
        "dr.ana",
        slice_index=12,
        z_mm=-140.0,
        previous_slice_index=12,
        previous_z_mm=-140.0,
        model_version="m1",
    )
    store.add_review(
        case.failed_uid,
        ReviewAction.ACCEPT,
        "=cmd()",
        slice_index=3,
        z_mm=0.0,
        previous_slice_index=3,
        previous_z_mm=0.0,
        model_version="m1",
    )
    summary = review_summary(store.reviews())
    assert summary["m1"]["accepted"] == 1 and summary["m1"]["corrected"] == 1
    assert summary["m1"]["acceptance"] == 0.5 and summary["m1"]["corrections_mm"] == [10.0]
    c = create_app(case.config).test_client()
    rows = c.get("/reviews.csv").get_data(as_text=True).splitlines()
    assert rows[0].startswith("time_utc,series_instance_uid,action,user")
    assert len(rows) == 4 and rows[1].endswith(",10.0,yes") and ",'=cmd()," in rows[3]
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'l3spot_review_acceptance_ratio{model_version="m1"} 0.5' in metrics
    assert 'l3spot_review_decisions{decision="corrected",model_version="m1"} 1.0' in metrics
    assert 'l3spot_review_correction_mm_bucket{le="10.0",model_version="m1"} 1.0' in metrics


# ---- a "not in the field of view" result can be corrected; a located L3 can be rejected ------


@pytest.fixture()
def missed(case: WebCase, monkeypatch: pytest.MonkeyPatch) -> WebCase:
    """The case with its result replaced by the locator's miss: "L3 not in the field of
    view" (no slice, no SEG), as the real pipeline writes it."""
    import dataclasses

    import worker.pipeline as pipeline
    from worker.locator.locate import L3Location

    def miss(*args: object, **kwargs: object) -> L3Location:
        return L3Location(False, None, None, None, 0.2, reason="L3 below the scanned range")

    monkeypatch.setattr(pipeline, "locate_l3", miss)
    uid = case.phantom_uid
    results = case.config.node.resolved_results_dir() / uid
    shutil.rmtree(results)
    series_dir = Path(JobStore(case.config.node.spool_dir).get(uid).series_dir)
    result = pipeline.analyze_series(series_dir, results, case.config)
    assert not result.l3.in_field_of_view and not (results / SEG_FILE).exists()
    return dataclasses.replace(case, result=result)


def test_a_not_in_fov_result_shows_the_whole_series_and_takes_a_correction(
    missed: WebCase,
) -> None:
    c = create_app(missed.config, celery=_own_celery(missed.config)).test_client()
    uid = missed.phantom_uid
    n = len(list_slices(Path(JobStore(missed.config.node.spool_dir).get(uid).series_dir)))
    assert n > 40
    html = c.get(f"/jobs/{uid}").get_data(as_text=True)
    # centred on the middle of the series, every slice reachable
    assert f'min="0" max="{n - 1}" value="{n // 2}"' in html
    assert 'id="review-correct"' in html and 'id="review-reject"' not in html
    assert "not in the field of view" in html
    assert c.get(f"/jobs/{uid}/slices/0.png").status_code == 200
    assert c.get(f"/jobs/{uid}/slices/{n - 1}.png?masks=1").status_code == 200
    token = _review_csrf(html)
    # nothing located: nothing to reject; a slice outside the series is refused
    for form in ({"action": "reject"}, {"action": "correct", "slice": str(n)}):
        resp = c.post(f"/jobs/{uid}/review", data={"csrf": token, **form})
        assert resp.status_code == 303 and "review_error" in resp.headers["Location"]
    store = JobStore(missed.config.node.spool_dir)
    assert store.reviews(uid) == []

    resp = c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "correct", "slice": "2"})
    assert resp.status_code == 303 and "reviewed=correct" in resp.headers["Location"]
    (review,) = store.reviews(uid)
    assert review.action == ReviewAction.CORRECT and review.slice_index == 2
    assert review.previous_slice_index is None and review.previous_z_mm is None
    assert review.z_mm is not None and review.sop_instance_uid
    (msg,) = _queued_messages(missed.config)
    assert msg["headers"]["task"] == "worker.tasks.remeasure_series"
    args, _, _ = json.loads(base64.b64decode(msg["body"]))
    assert args[1:] == [review.id, 2]
    (line,) = [r for r in AuditLog(audit_log_path(missed.config)).read() if r["event"] == "review"]
    assert line["review_action"] == "correct" and line["previous_slice_index"] is None


def test_remeasure_of_a_not_in_fov_result_measures_the_chosen_slice(
    missed: WebCase, analysed: WebCase
) -> None:
    """The worker's re-measure when the earlier result had no L3 (no SEG, no composition)."""
    from worker.tasks import run_remeasure

    uid = missed.phantom_uid
    chosen = analysed.result.l3.slice_index
    assert chosen is not None
    store = JobStore(missed.config.node.spool_dir)
    results = missed.config.node.resolved_results_dir() / uid
    old_sr = pydicom.dcmread(results / SR_FILE, stop_before_pixels=True)
    review = store.add_review(uid, "correct", "dr.ana", slice_index=chosen)
    token = store.mark_queued(uid)
    rec = store.get(uid)
    sent: list[tuple[str, str | None]] = []
    state = run_remeasure(
        Path(rec.series_dir),
        review.id,
        chosen,
        missed.config,
        store,
        lambda u, t: sent.append((u, t)),
        token=token,
    )
    assert state == JobState.EXPORTING and sent == [(uid, token)], store.get(uid).reason
    result = AnalysisResult.model_validate_json((results / RESULT_JSON).read_text())
    assert result.l3.in_field_of_view and result.l3.slice_index == chosen
    assert result.composition and (results / SEG_FILE).is_file()
    sr = pydicom.dcmread(results / SR_FILE)
    assert sr.VerificationFlag == "VERIFIED"
    ref = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    (v1,) = version_dirs(results)
    assert not (v1 / SEG_FILE).exists() and (v1 / RESULT_JSON).is_file()
    page = create_app(missed.config).test_client().get(f"/jobs/{uid}").get_data(as_text=True)
    assert 'id="l3-corrected"' in page and "chosen by dr.ana" in page
    assert "l3spot had found L3 not in the field of view" in page


def test_reject_records_the_decision_notes_the_job_and_measures_nothing(case: WebCase) -> None:
    from core.jobs import REJECTED_NOTE

    c = create_app(case.config).test_client()
    uid, l3 = case.phantom_uid, case.result.l3.slice_index
    html = c.get(f"/jobs/{uid}").get_data(as_text=True)
    assert 'id="review-reject"' in html and "confirm(" in html
    token = _review_csrf(html)
    resp = c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "reject"})
    assert resp.status_code == 303 and "reviewed=reject" in resp.headers["Location"]
    store = JobStore(case.config.node.spool_dir)
    (review,) = store.reviews(uid)
    assert review.action == ReviewAction.REJECT
    assert review.slice_index is None and review.z_mm is None and review.sop_instance_uid is None
    assert review.previous_slice_index == l3 and review.user_name == ANONYMOUS
    rec = store.get(uid)
    assert rec.state == JobState.DONE and (rec.note or "").startswith(REJECTED_NOTE)
    assert _queued_messages(case.config) == []
    (line,) = [r for r in AuditLog(audit_log_path(case.config)).read() if r["event"] == "review"]
    assert line["review_action"] == "reject" and line["slice_index"] is None
    assert line["previous_slice_index"] == l3
    page = c.get(resp.headers["Location"]).get_data(as_text=True)
    assert "L3 rejected" in page and "reject" in page[page.index('id="reviews"') :]
    rows = c.get("/reviews.csv").get_data(as_text=True).splitlines()
    assert rows[1].split(",")[2] == "reject"
    metrics = c.get("/metrics").get_data(as_text=True)
    version = case.result.algorithm.locator_model
    assert (
        f'l3spot_review_decisions{{decision="rejected",model_version="{version}"}} 1.0' in metrics
    )
    assert f'l3spot_review_acceptance_ratio{{model_version="{version}"}} 0.0' in metrics
    # a later acceptance (the reader changed their mind) clears the note
    c.post(f"/jobs/{uid}/review", data={"csrf": token, "action": "accept"})
    assert not (store.get(uid).note or "").startswith(REJECTED_NOTE)


def test_reject_follows_the_csrf_origin_and_role_rules(case: WebCase) -> None:
    from service.users import Role, add_user

    uid = case.phantom_uid
    c = create_app(case.config).test_client()
    html = c.get(f"/jobs/{uid}").get_data(as_text=True)
    token, retry_token = _review_csrf(html), _csrf(html)
    form = {"action": "reject"}
    assert c.post(f"/jobs/{uid}/review", data=form).status_code == 403
    assert c.post(f"/jobs/{uid}/review", data={**form, "csrf": retry_token}).status_code == 403
    evil = {"Origin": "http://evil.example"}
    resp = c.post(f"/jobs/{uid}/review", data={**form, "csrf": token}, headers=evil)
    assert resp.status_code == 403

    config = make_config(case.root, auth="users")
    add_user(JobStore(config.node.spool_dir), "rita", Role.READER, "a long reader password")
    c = create_app(config).test_client()
    auth = ("rita", "a long reader password")
    token = _review_csrf(c.get(f"/jobs/{uid}", auth=auth).get_data(as_text=True))
    assert c.post(f"/jobs/{uid}/review", data={**form, "csrf": token}).status_code == 401
    resp = c.post(f"/jobs/{uid}/review", data={**form, "csrf": token}, auth=auth)
    assert resp.status_code == 303
    assert [r.user_name for r in JobStore(config.node.spool_dir).reviews(uid)] == ["rita"]


def test_rejections_and_corrections_of_misses_in_the_csv_and_metrics(case: WebCase) -> None:
    from core.review_stats import review_summary

    store = JobStore(case.config.node.spool_dir)
    store.add_review(
        case.phantom_uid, ReviewAction.REJECT, "dr.ana", previous_slice_index=10,
        previous_z_mm=-150.0, model_version="m1",
    )  # fmt: skip
    store.add_review(
        case.failed_uid, ReviewAction.CORRECT, "dr.ana", slice_index=12, z_mm=-140.0,
        model_version="m1",
    )  # fmt: skip
    store.add_review(
        case.ineligible_uid, ReviewAction.ACCEPT, "dr.bo", slice_index=3, z_mm=0.0,
        previous_slice_index=3, previous_z_mm=0.0, model_version="m1",
    )  # fmt: skip
    summary = review_summary(store.reviews())["m1"]
    assert (summary["accepted"], summary["corrected"], summary["rejected"]) == (1, 1, 1)
    assert summary["acceptance"] == 0.3333 and summary["corrections_mm"] == []
    assert summary["corrected_from_not_in_fov"] == 1
    c = create_app(case.config).test_client()
    header, reject, correct, accept = (
        r.split(",") for r in c.get("/reviews.csv").get_data(as_text=True).splitlines()
    )
    col = {name: i for i, name in enumerate(header)}
    assert reject[col["action"]] == "reject" and reject[col["slice_index"]] == ""
    assert reject[col["correction_mm"]] == "" and reject[col["previous_in_field_of_view"]] == "yes"
    assert correct[col["previous_slice_index"]] == "" and correct[col["correction_mm"]] == ""
    assert correct[col["previous_in_field_of_view"]] == "no"
    assert accept[col["correction_mm"]] == "0.0"
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'l3spot_review_decisions{decision="rejected",model_version="m1"} 1.0' in metrics
    assert 'l3spot_review_acceptance_ratio{model_version="m1"} 0.3333' in metrics
    assert 'l3spot_review_corrections_from_not_in_fov{model_version="m1"} 1.0' in metrics
    assert 'l3spot_review_correction_mm_count{model_version="m1"} 0.0' in metrics
