"""The FHIR R4 Observation of the measurements: valid, coded, PHI-free, optionally POSTed."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fhir.resources.R4B.observation import Observation

import worker.pipeline as pipeline
from core.config import Config, ConfigError, load_config
from core.layout import FHIR_OBSERVATION_FILE, RESULT_JSON
from core.result import AnalysisResult, CompartmentResult, DerivedObjects, L3Result, SourceInfo
from tests.support.outputs import (
    PATIENT,
    SERIES_UID,
    STUDY_UID,
    write_series,
)
from worker.outputs.fhir import (
    CODE_SYSTEM,
    FhirExportError,
    build_observation,
    post_observation,
)

SR_UID = "1.2.826.0.1.3680043.8.498.77"
OBSERVATION_STATUSES = {"registered", "preliminary", "final", "amended"}


def _result(**kw) -> AnalysisResult:
    fields = dict(
        status="done",
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        l3=L3Result(in_field_of_view=True, slice_index=12, confidence=0.9),
        composition={
            "sma": CompartmentResult(area_cm2=150.234, mean_hu=38.71),
            "imat": CompartmentResult(area_cm2=8.5, mean_hu=-60.0),
            "vat": CompartmentResult(area_cm2=120.0, mean_hu=-95.0),
            "sat": CompartmentResult(area_cm2=200.0, mean_hu=-100.0),
        },
        smi_cm2_per_m2=51.98,
        source=SourceInfo(input_path="/x", kind="dicom", study_date="20240102"),
        derived=DerivedObjects(sr_sop_instance_uid=SR_UID),
    )
    fields.update(kw)
    return AnalysisResult(**fields)


def _components(obs: dict) -> dict[str, dict]:
    out = {}
    for c in obs["component"]:
        (coding,) = c["code"]["coding"]
        assert coding["system"] == CODE_SYSTEM
        out[coding["code"]] = c
    return out


def test_observation_validates_and_carries_the_panel() -> None:
    obs = build_observation(_result(), {"locator": "locator_cnn4_round3"})
    Observation.model_validate(obs)  # fhir.resources: structure, types, cardinalities
    assert obs["resourceType"] == "Observation" and obs["status"] == "final"
    assert obs["category"][0]["coding"][0]["code"] == "imaging"
    comps = _components(obs)
    assert set(comps) == {"sma-area", "smi", "vat-area", "sat-area", "imat-area", "sma-mean-hu"}
    q = comps["sma-area"]["valueQuantity"]
    assert (q["value"], q["system"], q["code"]) == (150.23, "http://unitsofmeasure.org", "cm2")
    assert comps["smi"]["valueQuantity"]["code"] == "cm2/m2"
    assert comps["sma-mean-hu"]["valueQuantity"] == {
        "value": 38.71,
        "unit": "HU",
        "system": "http://unitsofmeasure.org",
        "code": "[hnsf'U]",
    }
    assert comps["vat-area"]["valueQuantity"]["value"] == 120.0
    assert obs["bodySite"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "36470004",
        "display": "L3 vertebra",
    }
    assert obs["effectiveDateTime"] == "2024-01-02"
    assert obs["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{SR_UID}"}]
    (derived,) = obs["derivedFrom"]
    assert derived["type"] == "ImagingStudy"
    assert derived["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}
    assert SR_UID in derived["display"]
    (device,) = obs["contained"]
    assert obs["device"] == {"reference": f"#{device['id']}"}
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions["software"].startswith("l3spot ")
    assert versions["locator"] == "locator_cnn4_round3"
    assert obs["subject"]["type"] == "Patient" and "reference" not in obs["subject"]


def test_qa_flags_make_it_preliminary_and_missing_smi_says_why() -> None:
    obs = build_observation(
        _result(
            qa_flags=["body_truncated"],
            smi_cm2_per_m2=None,
            smi_reason="patient height unknown",
            source=SourceInfo(input_path="/x", kind="nifti", study_date=""),
        )
    )
    Observation.model_validate(obs)
    assert obs["status"] == "preliminary" and obs["status"] in OBSERVATION_STATUSES
    assert "Body cut by the field of view edge" in obs["note"][0]["text"]
    smi = _components(obs)["smi"]
    assert "valueQuantity" not in smi
    assert smi["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    assert smi["dataAbsentReason"]["text"] == "patient height unknown"
    assert "effectiveDateTime" not in obs  # no study date: none invented


def test_nothing_measured_gives_no_observation() -> None:
    with pytest.raises(FhirExportError, match="no body composition"):
        build_observation(_result(composition=None))


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("series") / "ct"
    write_series(d)
    return d


def test_analysis_writes_it_beside_result_json_without_patient_data(
    fake_stages: dict[str, bool], series_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = pipeline.analyze_series(series_dir, out, Config())
    path = out / FHIR_OBSERVATION_FILE
    assert path.is_file() and (out / RESULT_JSON).is_file()
    text = path.read_text()
    obs = Observation.model_validate_json(text).model_dump(mode="json", exclude_none=True)
    assert result.derived.files["fhir"] == FHIR_OBSERVATION_FILE
    assert obs["identifier"][0]["value"] == f"urn:oid:{result.derived.sr_sop_instance_uid}"
    sma = _components(obs)["sma-area"]["valueQuantity"]["value"]
    assert sma == pytest.approx(result.composition["sma"].area_cm2, abs=0.01)
    for phi in (PATIENT.patient_id, PATIENT.name, PATIENT.birth_date):
        assert phi and phi not in text
    # a re-run that no longer finds L3 removes the stale Observation
    fake_stages["in_fov"] = False
    pipeline.analyze_series(series_dir, out, Config())
    assert not path.exists()


class _Fhir(BaseHTTPRequestHandler):
    """A tiny FHIR endpoint: records each POST, answers with the configured status."""

    received: list[tuple[str, dict[str, str], bytes]] = []
    status = 201
    delay_s = 0.0

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, dict(self.headers), body))
        time.sleep(type(self).delay_s)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/fhir+json")
        payload = b'{"resourceType": "OperationOutcome"}'
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client timed out
            self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fhir_server() -> Iterator[str]:
    _Fhir.received, _Fhir.status, _Fhir.delay_s = [], 201, 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fhir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def _config(url: str, timeout: float = 5.0) -> Config:
    return Config.model_validate(
        {"fhir": {"enabled": True, "url": url, "timeout_seconds": timeout}}
    )


def test_enabled_export_posts_the_observation(
    fake_stages: dict[str, bool], series_dir: Path, tmp_path: Path, fhir_server: str
) -> None:
    out = tmp_path / "out"
    pipeline.analyze_series(series_dir, out, _config(fhir_server))
    ((path, headers, body),) = _Fhir.received
    assert path == "/fhir/Observation"
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert body == (out / FHIR_OBSERVATION_FILE).read_bytes()
    ident = json.loads(body)["identifier"][0]
    assert headers["If-None-Exist"] == f"identifier=urn:dicom:uid|{ident['value']}"


@pytest.mark.slow  # about 2 s: the quick subset stays under 2 min
def test_a_failing_endpoint_is_logged_and_never_fails_the_analysis(
    fake_stages: dict[str, bool],
    series_dir: Path,
    tmp_path: Path,
    fhir_server: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _Fhir.status = 500
    with caplog.at_level(logging.INFO, logger="worker.outputs.fhir"):
        result = pipeline.analyze_series(series_dir, tmp_path / "a", _config(fhir_server))
    assert result.status == "done" and (tmp_path / "a" / FHIR_OBSERVATION_FILE).is_file()
    failed = [r for r in caplog.records if r.getMessage() == "fhir_export_failed"]
    assert failed and "500" in failed[0].fields["reason"]

    _Fhir.status, _Fhir.delay_s = 201, 3.0  # a server slower than the timeout
    t0 = time.monotonic()
    result = pipeline.analyze_series(series_dir, tmp_path / "b", _config(fhir_server, 0.5))
    assert result.status == "done"
    assert time.monotonic() - t0 < 30  # generous: the POST gave up after its 0.5 s timeout


def test_post_reports_an_unreachable_server() -> None:
    with pytest.raises(FhirExportError, match="cannot POST"):
        post_observation(b"{}", "http://127.0.0.1:9/fhir", 2.0)  # discard port: nothing there


def test_enabled_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="fhir.url"):
        load_config(environ={"L3SPOT__FHIR__ENABLED": "true"}, path=None)
