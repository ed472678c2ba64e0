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
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from core.config import Config
from core.dicom import blank_malformed, malformed_elements
from core.errors import phi_safe_message
from core.jobs import JobState, JobStore
from worker import tasks

BAD = {"PatientBirthDate": "1950-01-02", "StudyTime": "12:30", "PatientAge": "63 years"}
#: Values that pass pydicom's VR pattern but not a conversion (Feb 30), numbers with a comma
#: or a unit (PatientSize/PatientWeight feed SMI and BMI), a name component over 64 chars.
BAD_MORE = {
    "PatientBirthDate": "19500230",
    "StudyDate": "2024-01-01",
    "PatientSize": "1,72",
    "PatientWeight": "72kg",
    "ReferringPhysicianName": "Dr" + "x" * 70,
    "AcquisitionDateTime": "2024-01-01T10:00",
}


def _series_with_bad_values(src: Path, dst: Path, bad: dict[str, str] = BAD) -> Path:
    series_uid = pydicom.dcmread(next(src.glob("*.dcm")), stop_before_pixels=True)
    folder = dst / str(series_uid.StudyInstanceUID) / str(series_uid.SeriesInstanceUID)
    shutil.copytree(src, folder)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for keyword, value in bad.items():  # the bytes as sent, not what pydicom would encode
            tag = pydicom.datadict.tag_for_keyword(keyword)
            raw = value.encode() + (b" " if len(value) % 2 else b"")
            vr = pydicom.datadict.dictionary_VR(keyword)
            ds._dict[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)
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
    # unquoted dates too (a UID in the message is kept)
    msg = phi_safe_message(ValueError("bad date 1950-01-02 or 19500102 in 1.2.840.10008.1"))
    assert "1950" not in msg and "1.2.840.10008.1" in msg
    # values that match the VR pattern but are no date, time or finite number
    odd = pydicom.Dataset()
    odd.PatientBirthDate, odd.StudyTime, odd.PatientSex = "19500230", "250000", "M"
    assert sorted(malformed_elements(odd)) == ["PatientBirthDate", "StudyTime"]


@pytest.mark.parametrize("bad", [BAD, BAD_MORE], ids=["birth_date", "more"])
def test_analysis_with_a_malformed_birth_date_finishes_and_never_shows_it(
    phantom_series, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: dict[str, str]
) -> None:
    src, _ = phantom_series
    cfg = Config()
    cfg.node.spool_dir = tmp_path / "spool"
    cfg.node.results_dir = tmp_path / "results"
    cfg.export.destinations = []
    folder = _series_with_bad_values(src, cfg.node.spool_dir, bad)
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
    assert all(keyword in warnings for keyword in bad)
    for name in ("sr.dcm", "seg.dcm", "sc.dcm"):
        derived = pydicom.dcmread(out / name)
        assert derived.PatientBirthDate == ""
        assert all(value not in str(derived) for value in bad.values())
    everything = (
        caplog.text + json.dumps(result) + json.dumps(rec.__dict__, default=str) + str(rec.reason)
    )
    for value in bad.values():
        assert value not in everything
