"""A reader's correction reaches a real PACS: Orthanc over C-STORE (issue 17, *Done when*).

The functions the Celery tasks call run in this process (:func:`worker.tasks.run_analysis`,
:func:`~worker.tasks.run_remeasure`, :func:`~worker.tasks.run_export`) with Orthanc's DICOM
port as the destination: the phantom series is analysed and its SEG, SR and SC sent; a
reader corrects the L3 slice; the re-measure's corrected SEG, SR and SC and the IHE IOCM
rejection note (``ko.dcm``) are sent. Orthanc's REST API then shows what a PACS without
IOCM keeps (docs/review.md "How PACS treat it"): both versions, the corrected SR verified,
naming the earlier one as its predecessor and numbered last in its series, and the
rejection note referencing exactly the earlier SEG, SR and SC. The corrected SR and the
note, fetched back from Orthanc, pass dciodvfy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from core.config import Config
from core.jobs import JobState, JobStore
from core.layout import KO_FILE, MEASUREMENT_FILES, RESULT_JSON, SR_FILE, version_dirs
from core.result import AnalysisResult
from tests.support.node import ORTHANC, OrthancPacs, start_orthanc, stop
from tests.unit.test_review import _dciodvfy_problems
from worker.tasks import run_analysis, run_export, run_remeasure

pytestmark = pytest.mark.integration

KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


@pytest.fixture()
def orthanc(tmp_path: Path) -> Iterator[OrthancPacs]:
    if not os.access(ORTHANC, os.X_OK):
        pytest.skip(f"{ORTHANC} not installed (see .ci/run)")
    pacs = start_orthanc(tmp_path / "orthanc")
    yield pacs
    stop(pacs.proc)


def _spool(phantom_dir: Path, spool: Path) -> tuple[str, str, Path]:
    """Copy the phantom series into the spool layout; (study, series, folder)."""
    files = sorted(phantom_dir.glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    folder = spool / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), folder


def _uids(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of the SEG, SR and SC in ``folder``."""
    out = {}
    for name in MEASUREMENT_FILES:
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)
    return out


def _instances(pacs: OrthancPacs, series: dict[str, Any]) -> list[dict[str, Any]]:
    """Orthanc's instance records of a series (MainDicomTags: SOP Instance UID, number)."""
    return [pacs.get(f"/instances/{i}") for i in series["Instances"]]


def test_a_correction_arrives_in_orthanc_beside_the_earlier_result_with_its_rejection_note(
    orthanc: OrthancPacs,
    phantom_series: tuple[Path, Any],
    tmp_path: Path,
) -> None:
    config = Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "var" / "spool"},
            "broker": {"url": None},
            "export": {
                "destinations": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom}
                ],
                "backoff_initial_seconds": 0,
            },
        }
    )
    store = JobStore(config.node.spool_dir)
    study, uid, series_dir = _spool(phantom_series[0], config.node.spool_dir)
    results = config.node.resolved_results_dir() / uid
    queued: list[str] = []

    # 1. the analysis, exported to Orthanc
    store.mark_received(uid, study, series_dir)
    token = store.mark_queued(uid, n_instances=len(list(series_dir.glob("*.dcm"))))
    assert run_analysis(series_dir, config, store, lambda s, t: queued.append(s), token) == (
        JobState.EXPORTING
    )
    assert run_export(uid, config, store) == ("done", 0.0)
    assert store.get(uid).state == JobState.DONE
    earlier = _uids(results)
    assert set(orthanc.sop_uids_of_study(study)) == set(earlier)
    earlier_sr = pydicom.dcmread(results / SR_FILE, stop_before_pixels=True)

    # 2. a reader chooses another slice; the re-measure is exported again
    result = AnalysisResult.model_validate_json((results / RESULT_JSON).read_text())
    assert result.l3.slice_index is not None
    chosen = result.l3.slice_index + 2
    review = store.add_review(
        uid, "correct", "dr.ana", slice_index=chosen, previous_slice_index=result.l3.slice_index
    )
    token = store.mark_queued(uid)
    state = run_remeasure(
        series_dir, review.id, chosen, config, store, lambda s, t: queued.append(s), token
    )
    assert state == JobState.EXPORTING, store.get(uid).reason
    assert run_export(uid, config, store) == ("done", 0.0)
    assert queued == [uid, uid] and store.get(uid).state == JobState.DONE
    corrected = _uids(results)
    (v1,) = version_dirs(results)
    assert _uids(v1) == earlier and not set(corrected) & set(earlier)
    note_uid = str(pydicom.dcmread(results / KO_FILE, stop_before_pixels=True).SOPInstanceUID)

    # 3. what Orthanc (no IOCM) holds: both versions, and the rejection note
    held = orthanc.sop_uids_of_study(study)
    assert sorted(held) == sorted([*earlier, *corrected, note_uid])  # each stored once
    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.series_of_study(study)}
    assert set(series) == {"SEG", "SR", "OT", "KO"}
    for modality in ("SEG", "SR", "OT"):  # the corrected objects are in the earlier series
        uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in _instances(orthanc, series[modality])}
        assert len(uids) == 2 and uids <= set(earlier) | set(corrected)
        assert series[modality]["MainDicomTags"]["SeriesInstanceUID"] in set(earlier.values())

    # the corrected SR: verified, its predecessor the earlier SR, the highest Instance Number
    srs = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in _instances(orthanc, series["SR"])}
    (new_sr_uid,) = set(srs) & set(corrected)
    new_sr = srs[new_sr_uid]
    numbers = {u: int(i["MainDicomTags"]["InstanceNumber"]) for u, i in srs.items()}
    assert numbers[new_sr_uid] == max(numbers.values()) > numbers[str(earlier_sr.SOPInstanceUID)]
    tags = orthanc.get(f"/instances/{new_sr['ID']}/simplified-tags")
    assert tags["VerificationFlag"] == "VERIFIED" and tags["CompletionFlag"] == "COMPLETE"
    assert tags["VerifyingObserverSequence"][0]["VerifyingObserverName"].startswith("dr.ana")
    (pred,) = tags["PredecessorDocumentsSequence"]
    assert pred["StudyInstanceUID"] == study
    (pred_series,) = pred["ReferencedSeriesSequence"]
    assert pred_series["SeriesInstanceUID"] == str(earlier_sr.SeriesInstanceUID)
    assert [r["ReferencedSOPInstanceUID"] for r in pred_series["ReferencedSOPSequence"]] == [
        str(earlier_sr.SOPInstanceUID)
    ]
    old_sr = srs[str(earlier_sr.SOPInstanceUID)]
    old_tags = orthanc.get(f"/instances/{old_sr['ID']}/simplified-tags")
    assert old_tags["VerificationFlag"] == "UNVERIFIED"

    # the rejection note: title 113001, exactly the earlier SEG, SR and SC in their series
    (note,) = _instances(orthanc, series["KO"])
    assert note["MainDicomTags"]["SOPInstanceUID"] == note_uid
    ko = orthanc.get(f"/instances/{note['ID']}/simplified-tags")
    assert ko["SOPClassUID"] == KOS
    assert ko["ConceptNameCodeSequence"][0]["CodeValue"] == "113001"
    assert ko["ConceptNameCodeSequence"][0]["CodingSchemeDesignator"] == "DCM"
    (evidence,) = ko["CurrentRequestedProcedureEvidenceSequence"]
    assert evidence["StudyInstanceUID"] == study
    rejected = {
        r["ReferencedSOPInstanceUID"]: s["SeriesInstanceUID"]
        for s in evidence["ReferencedSeriesSequence"]
        for r in s["ReferencedSOPSequence"]
    }
    assert rejected == earlier

    # dciodvfy on the objects as Orthanc returns them: no error, no warning the earlier SR
    # (as l3spot wrote it) does not have
    _, before = _dciodvfy_problems(v1 / SR_FILE)
    for name, instance in (("sr", new_sr), ("ko", note)):
        fetched = tmp_path / f"orthanc-{name}.dcm"
        fetched.write_bytes(orthanc.file(instance["ID"]))
        errors, warnings = _dciodvfy_problems(fetched)
        assert errors == [] and set(warnings) <= set(before), (name, errors + warnings)
