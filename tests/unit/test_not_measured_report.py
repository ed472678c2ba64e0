"""A CT series whose analysis fails still gets an SR and an SC that say so (issue 14, 7).

Reproduction: a failed or not-measurable eligible CT sent nothing to the PACS, so the
radiologist could not tell "not run" from "failed".
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from core.config import Config
from core.jobs import ExportState, JobState, JobStore
from tests.conftest import require_program
from worker import tasks
from worker.export import ExportOutcome
from worker.outputs.sr import report_evaluations


def _failing_series(phantom_series, spool: Path) -> Path:  # noqa: ANN001
    """The phantom series in the spool with Rescale Intercept NaN: the loader refuses it."""
    src, _ = phantom_series
    first = pydicom.dcmread(next(src.glob("*.dcm")), stop_before_pixels=True)
    folder = spool / str(first.StudyInstanceUID) / str(first.SeriesInstanceUID)
    shutil.copytree(src, folder)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = "NaN"
        ds.save_as(f)
    return folder


def _config(tmp_path: Path, report: bool = True) -> Config:
    return Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "spool"},
            "export": {
                "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
                "report_not_measured": report,
            },
        }
    )


def test_a_failed_analysis_sends_a_not_measured_report_and_stays_failed(
    phantom_series, tmp_path: Path
) -> None:
    cfg = _config(tmp_path)
    folder = _failing_series(phantom_series, cfg.node.spool_dir)
    series_uid = folder.name
    jobs = JobStore(cfg.node.spool_dir)
    jobs.mark_queued(series_uid)
    queued: list[str] = []
    assert tasks.run_analysis(folder, cfg, jobs, lambda s, t: queued.append(s)) == "failed"
    rec = jobs.get(series_uid)
    assert rec.state == JobState.FAILED and "Hounsfield" in (rec.reason or "")
    assert queued == [series_uid]  # the report goes to the PACS
    out = cfg.node.resolved_results_dir() / series_uid
    assert sorted(p.name for p in out.iterdir()) == ["sc.dcm", "sr.dcm"]
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.content.get_image_measurement_groups() == []  # issue 18: nothing OHIF throws on
    assert sr.ConceptNameCodeSequence[0].CodeValue == "L3NMREPORT"
    # "not measured" and the reason, in full
    assert report_evaluations(sr) == [("L3MEAS", "373067005"), ("L3NMREASON", rec.reason)]
    src = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    for path in (out / "sr.dcm", out / "sc.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    sent: list[list[str]] = []

    def accept(files: list[Path], dest: Any, calling: str, timeout: float) -> ExportOutcome:
        sent.append([f.name for f in files])
        return ExportOutcome(True, "0x0000", None, [])

    assert tasks.run_export(series_uid, cfg, jobs, accept) == ("done", 0.0)
    assert sent == [["sr.dcm", "sc.dcm"]]
    after = jobs.get(series_uid)
    assert after.state == JobState.FAILED and after.reason == rec.reason
    assert [e.state for e in after.exports] == [ExportState.DONE]
    assert after.export_finished_at is not None


def test_the_not_measured_sr_validates(phantom_series, tmp_path: Path) -> None:
    exe = require_program("dciodvfy")
    cfg = _config(tmp_path)
    folder = _failing_series(phantom_series, cfg.node.spool_dir)
    jobs = JobStore(cfg.node.spool_dir)
    jobs.mark_queued(folder.name)
    tasks.run_analysis(folder, cfg, jobs, lambda s, t: None)
    out = cfg.node.resolved_results_dir() / folder.name
    for name in ("sr.dcm", "sc.dcm"):
        lines = subprocess.run([exe, str(out / name)], capture_output=True, text=True).stderr
        errors = [ln for ln in lines.splitlines() if ln.startswith("Error")]
        assert errors == [], (name, errors)


@pytest.mark.parametrize("report", [False])
def test_the_report_can_be_switched_off(phantom_series, tmp_path: Path, report: bool) -> None:
    cfg = _config(tmp_path, report=report)
    folder = _failing_series(phantom_series, cfg.node.spool_dir)
    jobs = JobStore(cfg.node.spool_dir)
    jobs.mark_queued(folder.name)
    queued: list[str] = []
    assert tasks.run_analysis(folder, cfg, jobs, lambda s, t: queued.append(s)) == "failed"
    assert queued == [] and not (cfg.node.resolved_results_dir() / folder.name).exists()
