"""DICOMweb destinations against a real server: Orthanc with its DICOMweb plugin (issue 18).

SEG, SR and SC written by the real output layer (worker/pipeline.py ``write_outputs`` on the
synthetic series of tests/support/outputs.py) are exported by :func:`worker.tasks.run_export`
to Orthanc by STOW-RS, with HTTP basic authentication, and found there by QIDO-RS and the
REST API. A stopped Orthanc is "connection refused" and retried until it is back; a wrong
bearer token is an HTTP 401 with a reason that says what to check. The readiness probe
(QIDO-RS) says the same things.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from core.config import Config
from core.echo import EchoOutcome, probe_destination
from core.jobs import DestinationState, ExportState, JobState, JobStore
from tests.support.node import ORTHANC, ORTHANC_DICOMWEB_PLUGIN, OrthancPacs, start_orthanc, stop
from tests.support.outputs import (
    SERIES_UID,
    STUDY_UID,
    fabricated_composition,
    fabricated_location,
    synthetic_volume,
    write_series,
)
from worker.tasks import run_analysis, run_export

USER = ("l3spot", "stow-Secret-1")
SEG, SR, SC = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)


@pytest.fixture(autouse=True)
def _runtime() -> None:
    for prog in (ORTHANC, ORTHANC_DICOMWEB_PLUGIN):
        if not os.path.exists(prog):
            pytest.skip(f"{prog} not installed (orthanc, orthanc-dicomweb: see .ci/run)")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seg.dcm, sr.dcm, sc.dcm of the synthetic series, by the real output layer."""
    from worker.mip import frontal_mip
    from worker.pipeline import write_outputs

    root = tmp_path_factory.mktemp("dicomweb-results")
    volume = synthetic_volume(write_series(root / "ct"))
    out = root / "out"
    out.mkdir()
    write_outputs(
        volume,
        frontal_mip(volume, 2.0),
        fabricated_location(),
        fabricated_composition(),
        [],
        out,
    )
    return out


class Case:
    """A job whose analysis is done and whose export to one DICOMweb destination waits."""

    def __init__(self, root: Path, results: Path, dest: dict[str, object]) -> None:
        self.config = Config.model_validate(
            {
                "node": {"spool_dir": root / "spool"},
                "export": {"destinations": [{"kind": "dicomweb", **dest}]},
            }
        )
        self.label = self.config.export.destinations[0].label
        self.jobs = JobStore(self.config.node.spool_dir)
        self.series = SERIES_UID  # the synthetic CT series the results derive from
        spooled = root / "spool" / STUDY_UID / self.series
        spooled.mkdir(parents=True)

        def pipeline(input_path: Path, out_dir: Path, cfg: Config) -> dict:
            for f in results.glob("*.dcm"):
                shutil.copy(f, out_dir / f.name)
            return {}

        token = self.jobs.mark_queued(self.series, 30)
        state = run_analysis(spooled, self.config, self.jobs, lambda s, t: None, token, pipeline)
        assert state == "exporting"

    def export(self) -> tuple[str, float]:
        return run_export(self.series, self.config, self.jobs)


def _qido_instances(pacs: OrthancPacs, study_uid: str) -> list[dict]:
    """QIDO-RS Search for Instances of a study (PS3.18 10.6.1), with basic authentication."""
    req = urllib.request.Request(
        f"{pacs.dicomweb_url}/studies/{study_uid}/instances",
        headers={
            "Accept": "application/dicom+json",
            "Authorization": "Basic " + base64.b64encode(":".join(USER).encode()).decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"[]")


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[OrthancPacs]:
    pacs = start_orthanc(tmp_path / "orthanc", dicomweb=True, user=USER)
    yield pacs
    stop(pacs.proc)


def test_results_go_to_orthanc_by_stow_rs_and_are_found_by_qido_rs(
    orthanc: OrthancPacs, results: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "orthanc-password"
    secret.write_text(USER[1] + "\n")
    case = Case(
        tmp_path,
        results,
        {"url": orthanc.dicomweb_url, "auth": "basic", "username": USER[0], "secret_file": secret},
    )
    probe = probe_destination(case.config.export.destinations[0], timeout_s=10)
    assert probe.ok and probe.check == "QIDO-RS", probe
    assert case.export() == ("done", 0.0)
    rec = case.jobs.get(case.series)
    assert rec.state == JobState.DONE and rec.exports[0].destination == orthanc.dicomweb_url
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): f.name for f in results.glob("*.dcm")}
    found = _qido_instances(orthanc, STUDY_UID)
    classes = {i["00080016"]["Value"][0] for i in found}
    uids = {i["00080018"]["Value"][0] for i in found}
    assert uids == set(sent) and classes == {SEG, SR, SC}
    assert sorted(orthanc.sop_uids_of_study(STUDY_UID)) == sorted(sent)  # REST API: once each
    (state,) = case.jobs.destination_states([orthanc.dicomweb_url])
    assert state.state == DestinationState.OK


@pytest.mark.slow  # two Orthanc starts and stops
def test_a_stopped_orthanc_is_connection_refused_and_retried_until_it_is_back(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("L3SPOT_TEST_ORTHANC_PASSWORD", USER[1])
    pacs = start_orthanc(tmp_path / "orthanc", dicomweb=True, user=USER)
    stop(pacs.proc)
    case = Case(
        tmp_path,
        results,
        {
            "url": pacs.dicomweb_url,
            "auth": "basic",
            "username": USER[0],
            "secret_env": "L3SPOT_TEST_ORTHANC_PASSWORD",
        },
    )
    probe = probe_destination(case.config.export.destinations[0], timeout_s=5)
    assert probe.outcome is EchoOutcome.REFUSED
    assert case.export() == ("retry", 5.0)
    assert case.export() == ("retry", 10.0)
    (exp,) = case.jobs.get(case.series).exports
    assert exp.state == ExportState.RETRYING and exp.attempts == 2
    assert f"connection refused by 127.0.0.1:{pacs.http}" in (exp.last_error or "")
    assert case.jobs.get(case.series).state == JobState.EXPORTING
    back = start_orthanc(tmp_path / "orthanc", dicomweb=True, user=USER, http_port=pacs.http)
    try:
        assert case.export() == ("done", 0.0)
        assert len(back.sop_uids_of_study(STUDY_UID)) == 3
    finally:
        stop(back.proc)
    assert case.jobs.get(case.series).state == JobState.DONE


def test_a_wrong_bearer_token_is_http_401_with_what_to_check(
    orthanc: OrthancPacs, results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("L3SPOT_TEST_TOKEN", "not-the-token")
    case = Case(
        tmp_path,
        results,
        {"url": orthanc.dicomweb_url, "auth": "bearer", "secret_env": "L3SPOT_TEST_TOKEN"},
    )
    probe = probe_destination(case.config.export.destinations[0], timeout_s=10)
    assert probe.outcome is EchoOutcome.FAILED and probe.status == 401
    assert case.export() == ("retry", 5.0)
    (exp,) = case.jobs.get(case.series).exports
    assert exp.last_status == "HTTP 401"
    assert exp.last_error == (
        f"{orthanc.dicomweb_url}: no instance stored, STOW-RS answered HTTP 401 Unauthorized: "
        "the server refused our credentials; check the destination's auth and secret"
    )
    assert "not-the-token" not in json.dumps(case.jobs.get(case.series).__dict__, default=str)
    assert orthanc.sop_uids_of_study(STUDY_UID) == []
