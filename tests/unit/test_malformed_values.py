"""Malformed header values never discard an analysis nor leak (issue 14, defect 4).

Reproduction: PatientBirthDate "1950-01-02" (not DA) made the finished analysis fail with
``ValueError: Unable to convert '1950-01-02' to 'DA'`` and wrote the birth date into the log,
the job database and the web page.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pydicom
import pytest

from core.config import Config
from core.dicom import blank_malformed, malformed_elements
from core.errors import phi_safe_message
from core.jobs import JobState, JobStore
from worker import tasks

BAD = {"PatientBirthDate": "1950-01-02", "StudyTime": "12:30", "PatientAge": "63 years"}


def _series_with_bad_values(src: Path, dst: Path) -> Path:
    series_uid = pydicom.dcmread(next(src.glob("*.dcm")), stop_before_pixels=True)
    folder = dst / str(series_uid.StudyInstanceUID) / str(series_uid.SeriesInstanceUID)
    shutil.copytree(src, folder)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for keyword, value in BAD.items():
            ds.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
        ds.save_as(f)
    return folder


def test_malformed_elements_are_named_not_shown() -> None:
    ds = pydicom.Dataset()
    ds.PatientBirthDate = "19500102"
    ds.PatientSex = "F"
    assert malformed_elements(ds) == []
    for keyword, value in BAD.items():
        ds.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
    assert sorted(blank_malformed(ds)) == sorted(BAD)
    assert all(ds[k].value == "" for k in BAD) and ds.PatientSex == "F"
    msg = phi_safe_message(ValueError("Unable to convert '1950-01-02' to 'DA'"))
    assert "1950" not in msg and msg.startswith("ValueError")


def test_analysis_with_a_malformed_birth_date_finishes_and_never_shows_it(
    phantom_series, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, _ = phantom_series
    cfg = Config()
    cfg.node.spool_dir = tmp_path / "spool"
    cfg.node.results_dir = tmp_path / "results"
    cfg.export.destinations = []
    folder = _series_with_bad_values(src, cfg.node.spool_dir)
    jobs = JobStore(cfg.node.spool_dir)
    series_uid = folder.name
    jobs.mark_queued(series_uid)
    caplog.set_level(logging.DEBUG)
    state = tasks.run_analysis(folder, cfg, jobs, lambda s, t: None, None)
    rec = jobs.get(series_uid)
    assert state == JobState.DONE and rec.state == JobState.DONE, rec.reason
    out = cfg.node.resolved_results_dir() / series_uid
    result = json.loads((out / "result.json").read_text())
    warnings = " ".join(result["source"]["load_warnings"])
    assert "PatientBirthDate" in warnings and "StudyTime" in warnings
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.PatientBirthDate == ""
    everything = (
        caplog.text + json.dumps(result) + json.dumps(rec.__dict__, default=str) + str(rec.reason)
    )
    for value in BAD.values():
        assert value not in everything
