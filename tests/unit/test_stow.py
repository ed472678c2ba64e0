"""STOW-RS export (worker/stow.py): one request, PS3.18 Table 10.5.3-1 read as it says.

Against a tiny local HTTP server (tests/support/dicomweb.py) answering what each test needs;
the same attempts against Orthanc's DICOMweb plugin are in
tests/integration/test_integration_dicomweb.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from core.config import Config, DicomwebDestination
from core.jobs import DestinationState, ExportState, JobState, JobStore
from core.layout import result_files
from tests.support.dicomweb import DicomwebStub, failed_sop_body
from tests.support.node import free_port, make_ct
from worker.export import FailureKind, send_results
from worker.tasks import run_analysis, run_export

TOKEN_ENV = "L3SPOT_TEST_STOW_TOKEN"


@pytest.fixture()
def stub() -> Iterator[DicomwebStub]:
    s = DicomwebStub()
    yield s
    s.close()


@pytest.fixture()
def files(tmp_path: Path) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    for i, name in enumerate(("seg.dcm", "sr.dcm", "sc.dcm")):
        make_ct(study, series, i).save_as(tmp_path / name, enforce_file_format=True)
    return result_files(tmp_path)


def _uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def _dest(url: str, **kw: object) -> DicomwebDestination:
    return DicomwebDestination.model_validate({"kind": "dicomweb", "url": url, **kw})


def test_all_objects_go_in_one_multipart_request_with_the_bearer_token(
    stub: DicomwebStub, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "t0ken-1\n")
    uids = _uids(files)
    stub.body = failed_sop_body([], [(CTImageStorage, u) for u in uids])
    dest = _dest(stub.url, auth="bearer", secret_env=TOKEN_ENV)
    outcome = send_results(files, dest, "L3SPOT", timeout_s=10)
    assert outcome.ok and outcome.kind is None and outcome.stored == uids
    assert len(stub.requests) == 1
    req = stub.requests[0]
    assert (req.method, req.path) == ("POST", "/dicom-web/studies")
    assert req.headers["Authorization"] == "Bearer t0ken-1"
    ctype = req.headers["Content-Type"]
    assert ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype
    assert "chunked" not in req.headers.get("Transfer-Encoding", "")
    parts = req.parts()
    assert len(parts) == 3 and all(p[128:132] == b"DICM" for p in parts)


def test_a_202_names_each_instance_not_stored_and_its_failure_reason(
    stub: DicomwebStub, files: list[Path]
) -> None:
    uids = _uids(files)
    stub.status = 202
    stub.body = failed_sop_body(
        [(CTImageStorage, uids[1], 0xC000)], [(CTImageStorage, uids[0]), (CTImageStorage, uids[2])]
    )
    outcome = send_results(files, _dest(stub.url), "L3SPOT", timeout_s=10)
    assert not outcome.ok and outcome.kind == FailureKind.STORE_STATUS
    assert outcome.status == "0xC000"
    assert outcome.stored == [uids[0], uids[2]]
    assert outcome.error == (
        f"{stub.url}: 1 of 3 instances not stored (STOW-RS answered HTTP 202 Accepted): "
        f"{uids[1]} (CT Image Storage): 0xC000 (Cannot Understand)"
    )
    assert outcome.reached  # the server stores: a problem of these objects, not of the PACS


def test_a_202_with_warnings_only_is_stored_but_not_one_that_does_not_say_what(
    stub: DicomwebStub, files: list[Path]
) -> None:
    stub.status = 202
    stub.body = failed_sop_body([], [(CTImageStorage, u) for u in _uids(files)])
    assert send_results(files, _dest(stub.url), "L3SPOT", timeout_s=10).ok
    stub.body = None
    outcome = send_results(files, _dest(stub.url), "L3SPOT", timeout_s=10)
    assert not outcome.ok and outcome.kind == FailureKind.STORE_STATUS
    assert "cannot tell which instances were stored" in (outcome.error or "")


@pytest.mark.parametrize(
    ("status", "kind", "reached", "text"),
    [
        (409, FailureKind.STORE_STATUS, True, "no instance stored, STOW-RS answered HTTP 409"),
        (400, FailureKind.STORE_STATUS, True, "HTTP 400 Bad Request"),
        (415, FailureKind.STORE_STATUS, True, "does not accept application/dicom"),
        (401, FailureKind.UNAUTHORIZED, False, "401 Unauthorized: the server refused our"),
        (403, FailureKind.UNAUTHORIZED, False, "HTTP 403 Forbidden"),
        (404, FailureKind.HTTP_STATUS, False, "no DICOMweb service at this URL"),
        (503, FailureKind.HTTP_STATUS, False, "HTTP 503 Service Unavailable"),
        (500, FailureKind.HTTP_STATUS, False, "HTTP 500 Internal Server Error"),
    ],
)
def test_http_errors_say_what_the_server_answered(
    stub: DicomwebStub,
    files: list[Path],
    status: int,
    kind: FailureKind,
    reached: bool,
    text: str,
) -> None:
    stub.status = status
    outcome = send_results(files, _dest(stub.url), "L3SPOT", timeout_s=10)
    assert not outcome.ok and outcome.kind == kind and outcome.reached is reached
    assert outcome.status == f"HTTP {status}" and text in (outcome.error or "")
    assert len(stub.requests) == 1  # dicomweb-client's own retries are off: the task retries


def test_a_409_listing_out_of_resources_means_the_server_cannot_store_now(
    stub: DicomwebStub, files: list[Path]
) -> None:
    uids = _uids(files)
    stub.status = 409
    stub.body = failed_sop_body([(CTImageStorage, u, 0xA700) for u in uids])
    outcome = send_results(files, _dest(stub.url), "L3SPOT", timeout_s=10)
    assert outcome.kind == FailureKind.STORE_STATUS and outcome.status == "0xA700"
    assert "3 of 3 instances not stored (STOW-RS answered HTTP 409 Conflict)" in outcome.error
    assert "0xA700 (Refused: Out of Resources)" in outcome.error
    assert not outcome.reached  # like C-STORE A7xx: nothing can be stored there now


def test_a_closed_port_is_connection_refused(files: list[Path]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    outcome = send_results(files, _dest(url), "L3SPOT", timeout_s=5)
    assert outcome.kind == FailureKind.CONNECTION_REFUSED and not outcome.reached
    assert outcome.error == (
        f"{url}: connection refused by 127.0.0.1:{url.split(':')[2].split('/')[0]} "
        "(nothing listens there: the server is down or the port is wrong)"
    )


def test_a_server_that_does_not_answer_in_time_is_no_response(
    stub: DicomwebStub, files: list[Path]
) -> None:
    stub.delay_s = 3.0
    outcome = send_results(files, _dest(stub.url, timeout_seconds=0.5), "L3SPOT", timeout_s=30)
    assert outcome.kind == FailureKind.NO_STORE_RESPONSE
    assert "no HTTP response from 127.0.0.1" in (outcome.error or "")
    assert "within 0.5 s" in (outcome.error or "")  # the destination's own timeout


def test_https_to_a_plain_http_server_is_a_tls_failure(
    stub: DicomwebStub, files: list[Path]
) -> None:
    dest = _dest(stub.url.replace("http://", "https://"))
    outcome = send_results(files, dest, "L3SPOT", timeout_s=5)
    assert outcome.kind == FailureKind.TLS and not outcome.reached
    assert f"TLS handshake with 127.0.0.1:{stub.port} failed" in (outcome.error or "")


def test_a_missing_secret_is_named_and_nothing_is_sent(
    stub: DicomwebStub, files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    outcome = send_results(
        files, _dest(stub.url, auth="bearer", secret_env=TOKEN_ENV), "L3SPOT", timeout_s=5
    )
    assert outcome.kind == FailureKind.CREDENTIALS and not outcome.reached
    assert f"the environment variable {TOKEN_ENV} (secret_env) is not set" in outcome.error
    secret = tmp_path / "password"
    dest = _dest(stub.url, auth="basic", username="l3spot", secret_file=secret)
    outcome = send_results(files, dest, "L3SPOT", timeout_s=5)
    assert outcome.kind == FailureKind.CREDENTIALS and str(secret) in (outcome.error or "")
    assert stub.requests == []
    # the file is read at each attempt: a rotated secret needs no restart
    secret.write_text("pa55\n")
    assert send_results(files, dest, "L3SPOT", timeout_s=5).ok
    assert stub.requests[0].headers["Authorization"] == "Basic bDNzcG90OnBhNTU="


def _export_case(tmp_path: Path, url: str) -> tuple[Config, JobStore, str]:
    """A series analysed (real DICOM files as its results) and waiting for its export."""
    config = Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "spool"},
            "export": {"destinations": [{"kind": "dicomweb", "url": url}]},
        }
    )
    jobs = JobStore(config.node.spool_dir)
    study, series = generate_uid(), generate_uid()
    spooled = tmp_path / "spool" / study / series
    spooled.mkdir(parents=True)

    def pipeline(input_path: Path, out_dir: Path, cfg: Config) -> dict:
        for i, name in enumerate(("seg.dcm", "sr.dcm", "sc.dcm")):
            make_ct(study, series, i).save_as(out_dir / name, enforce_file_format=True)
        return {}

    token = jobs.mark_queued(series, 30)
    assert run_analysis(spooled, config, jobs, lambda s, t: None, token, pipeline) == "exporting"
    return config, jobs, series


def test_run_export_retries_and_records_a_dicomweb_destination_like_a_pacs(
    stub: DicomwebStub, tmp_path: Path
) -> None:
    """The same policy and records as C-STORE: retry with backoff, the reason per attempt,
    the destination's state, done when the server answers 200."""
    config, jobs, series = _export_case(tmp_path, stub.url)
    clock = iter(float(t) for t in range(1_000_000, 2_000_000, 5))
    stub.status = 503
    assert run_export(series, config, jobs, clock=lambda: next(clock)) == ("retry", 5.0)
    assert run_export(series, config, jobs, clock=lambda: next(clock)) == ("retry", 10.0)
    (exp,) = jobs.get(series).exports
    assert exp.destination == stub.url and exp.state == ExportState.RETRYING
    assert exp.attempts == 2 and exp.last_status == "HTTP 503"
    assert "HTTP 503 Service Unavailable" in (exp.last_error or "")
    (state,) = jobs.destination_states([stub.url])
    assert state.state == DestinationState.RETRYING and state.last_status == "HTTP 503"
    stub.status = 200
    assert run_export(series, config, jobs, clock=lambda: next(clock)) == ("done", 0.0)
    rec = jobs.get(series)
    assert rec.state == JobState.DONE and rec.exports[0].state == ExportState.DONE
    assert jobs.destination_states([stub.url])[0].state == DestinationState.OK


def test_run_export_gives_up_after_the_window_with_the_servers_answer(
    stub: DicomwebStub, tmp_path: Path
) -> None:
    config, jobs, series = _export_case(tmp_path, stub.url)
    config.export.retry_for_hours = 0.01  # 36 s
    stub.status = 401
    now = [time.time()]

    def clock() -> float:
        now[0] += 20
        return now[0]

    outcome = None
    for _ in range(10):
        outcome, _wait = run_export(series, config, jobs, clock=clock)
        if outcome != "retry":
            break
    assert outcome == "failed"
    rec = jobs.get(series)
    assert rec.state == JobState.FAILED
    assert f"export to {stub.url} failed after" in (rec.reason or "")
    assert "status HTTP 401" in (rec.reason or "") and "HTTP 401 Unauthorized" in rec.reason
