"""core/dicomweb.py: the HTTP session of a DICOMweb destination; core/echo.py: its QIDO-RS probe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Destination, DicomwebDestination
from core.dicomweb import http_session, http_status_text
from core.echo import EchoOutcome, check_name, probe_destination, probe_dicomweb
from tests.support.dicomweb import DicomwebStub
from tests.support.node import free_port

ENV = "L3SPOT_TEST_QIDO_TOKEN"


@pytest.fixture()
def stub() -> Iterator[DicomwebStub]:
    s = DicomwebStub()
    yield s
    s.close()


def _dest(url: str, **kw: object) -> DicomwebDestination:
    return DicomwebDestination.model_validate({"kind": "dicomweb", "url": url, **kw})


def test_the_probe_is_one_qido_rs_search_with_our_credentials(
    stub: DicomwebStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "tok")
    stub.status, stub.body = 200, []  # type: ignore[assignment]
    dest = _dest(stub.url, auth="bearer", secret_env=ENV)
    r = probe_destination(dest, "L3SPOT", timeout_s=5)
    assert r.ok and r.check == "QIDO-RS" == check_name(dest) and r.status == 200
    assert r.rtt_ms is not None and r.as_dict()["check"] == "QIDO-RS"
    (req,) = stub.requests
    assert (req.method, req.path) == ("GET", "/dicom-web/studies?limit=1")
    assert req.headers["Authorization"] == "Bearer tok"
    assert req.headers["Accept"] == "application/dicom+json"
    stub.status, stub.body = 204, None  # no study yet: the service still answers
    assert probe_dicomweb(dest, 5).ok


def test_a_refused_token_a_stopped_server_and_a_missing_secret_say_so(
    stub: DicomwebStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "wrong")
    stub.status = 401
    r = probe_dicomweb(_dest(stub.url, auth="bearer", secret_env=ENV), 5)
    assert r.outcome is EchoOutcome.FAILED and r.status == 401
    assert r.detail.startswith("HTTP 401 Unauthorized: the server refused our credentials")
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    r = probe_dicomweb(_dest(closed), 5)
    assert r.outcome is EchoOutcome.REFUSED and r.status is None
    assert "connection refused by 127.0.0.1" in r.detail
    monkeypatch.delenv(ENV)
    r = probe_dicomweb(_dest(stub.url, auth="bearer", secret_env=ENV), 5)
    assert r.outcome is EchoOutcome.FAILED and f"{ENV} (secret_env) is not set" in r.detail
    r = probe_dicomweb(_dest("https://pacs.invalid/dicom-web"), 5)  # RFC 6761: never resolves
    assert r.outcome is EchoOutcome.UNKNOWN_HOST


def test_a_hung_server_is_a_timeout(stub: DicomwebStub) -> None:
    stub.delay_s = 3.0
    r = probe_dicomweb(_dest(stub.url), timeout_s=0.5)
    assert r.outcome is EchoOutcome.TIMEOUT and "within 0.5 s" in r.detail


def test_a_c_store_destination_is_still_c_echoed() -> None:
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    r = probe_destination(dest, "L3SPOT", timeout_s=2)
    assert check_name(dest) == r.check == "C-ECHO" and r.outcome is EchoOutcome.REFUSED


def test_the_session_carries_the_auth_and_tls_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "pw")
    basic = http_session(_dest("https://pacs/dw", auth="basic", username="u", secret_env=ENV))
    assert basic.auth == ("u", "pw") and basic.verify is True
    assert "Authorization" not in basic.headers
    ca = tmp_path / "ca.pem"
    assert http_session(_dest("https://pacs/dw", tls_ca_certificate=ca)).verify == str(ca)
    assert http_session(_dest("https://pacs/dw", tls_verify=False)).verify is False


def test_http_status_text_names_the_status_and_what_to_check() -> None:
    assert http_status_text(503).startswith("HTTP 503 Service Unavailable: the server is")
    assert http_status_text(409) == "HTTP 409 Conflict"
    assert http_status_text(599) == "HTTP 599"
