"""The IHE IOCM rejection note of a reader's correction (worker/outputs/ko.py, issue 17).

A correction writes ``ko.dcm``: a Key Object Selection "Rejected for Quality Reasons" that
references exactly the SEG, SR and SC it superseded, in its own series of the study, with
deterministic UIDs, and that dciodvfy accepts. The re-measures run the real pipeline on the
phantom case of tests/unit/test_review.py.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.config import Config
from core.derived import is_own_output
from core.jobs import JobStore, ReviewRecord
from core.layout import KO_FILE, MEASUREMENT_FILES, SR_FILE, result_files, version_dirs
from tests.unit.test_review import _dciodvfy_problems, analysed, case  # noqa: F401 (fixtures)
from tests.unit.test_web import WebCase

KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


def _correct(
    wc: WebCase, slice_index: int, user: str = "dr.ana", config: Config | None = None
) -> tuple[ReviewRecord, Path]:
    """Record a correction to ``slice_index`` and run the re-measure; (review, results dir)."""
    from worker.tasks import run_remeasure

    uid = wc.phantom_uid
    config = config or wc.config
    store = JobStore(config.node.spool_dir)
    review = store.add_review(uid, "correct", user, slice_index=slice_index)
    token = store.mark_queued(uid)
    series_dir = Path(store.get(uid).series_dir)
    state = run_remeasure(
        series_dir, review.id, slice_index, config, store, lambda u, t: None, token
    )
    assert state == "exporting", store.get(uid).reason
    return review, config.node.resolved_results_dir() / uid


def _objects(folder: Path) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, Series Instance UID) of the SEG, SR and SC."""
    out = {}
    for name in MEASUREMENT_FILES:
        ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), str(ds.SeriesInstanceUID))
    return out


def _rejected(ko: Dataset) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """What a note rejects: evidence (SOP Instance -> (class, series)) and content items
    (SOP Instance -> class)."""
    evidence = {
        str(ref.ReferencedSOPInstanceUID): (
            str(ref.ReferencedSOPClassUID),
            str(se.SeriesInstanceUID),
        )
        for st in ko.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for ref in se.ReferencedSOPSequence
    }
    items = {
        str(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): str(
            it.ReferencedSOPSequence[0].ReferencedSOPClassUID
        )
        for it in ko.ContentSequence
        if it.ValueType in ("IMAGE", "COMPOSITE")
    }
    return evidence, items


def _code(item: Dataset, attr: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, attr)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


@pytest.mark.slow  # a real analysis and re-measure: about 5 s
def test_a_correction_writes_a_rejection_note_of_exactly_the_superseded_objects(
    case: WebCase,  # noqa: F811
) -> None:
    from worker.outputs.ko import KO_SERIES_NUMBER, write_rejection_note
    from worker.outputs.review import Correction

    l3 = case.result.l3.slice_index
    assert l3 is not None
    review, results = _correct(case, l3 + 2)
    (v1,) = version_dirs(results)
    earlier, current = _objects(v1), _objects(results)
    ko = pydicom.dcmread(results / KO_FILE)
    sr = pydicom.dcmread(results / SR_FILE, stop_before_pixels=True)

    assert ko.SOPClassUID == KOS and ko.Modality == "KO"
    assert _code(ko) == ("113001", "DCM")  # Rejected for Quality Reasons (CID 7010)
    modifier = ko.ContentSequence[0]  # TID 2010 row 2, CID 7011
    assert modifier.RelationshipType == "HAS CONCEPT MOD" and _code(modifier) == ("113011", "DCM")
    assert _code(modifier, "ConceptCodeSequence") == ("111219", "DCM")
    assert ko.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    # exactly the earlier SEG, SR and SC, in their series; nothing of the corrected result
    evidence, items = _rejected(ko)
    assert evidence == earlier
    assert items == {uid: cls for uid, (cls, _) in earlier.items()}
    assert not set(evidence) & set(current)
    # same patient and study, its own series, the next instance, made by l3spot
    assert ko.StudyInstanceUID == sr.StudyInstanceUID and ko.PatientID == sr.PatientID
    own_series = {series for _, series in earlier.values()} | {s for _, s in current.values()}
    assert ko.SeriesInstanceUID not in own_series and ko.SeriesNumber == KO_SERIES_NUMBER
    assert ko.InstanceNumber == review.id + 1
    assert is_own_output(str(ko.SOPClassUID), str(ko.Manufacturer))
    person = [it for it in ko.ContentSequence if it.ValueType == "PNAME"]
    assert [str(it.PersonName) for it in person] == ["dr.ana^"]
    # dciodvfy: no error, no warning the earlier SR did not have (the phantom's study lacks
    # Study Time and Study ID)
    errors, warnings = _dciodvfy_problems(results / KO_FILE)
    _, before = _dciodvfy_problems(v1 / SR_FILE)
    assert errors == [] and set(warnings) <= set(before), errors + warnings
    # sent after the corrected objects
    assert [p.name for p in result_files(results)] == [*MEASUREMENT_FILES, KO_FILE]
    # a repeated task writes the same note
    store = JobStore(case.config.node.spool_dir)
    again = Correction(review.id, "dr.ana", "l3spot", store.review(review.id).created_at)
    rewritten = write_rejection_note(results, again, case.phantom_uid)
    assert rewritten is not None
    assert pydicom.dcmread(rewritten).SOPInstanceUID == ko.SOPInstanceUID

    # a second correction rejects the first correction's objects only (v1's were rejected
    # by the first note); the first note is kept with them in v2
    review2, _ = _correct(case, l3, user="dr.bo")
    v1, v2 = version_dirs(results)
    ko2 = pydicom.dcmread(results / KO_FILE)
    evidence2, _ = _rejected(ko2)
    assert evidence2 == current == _objects(v2)
    assert ko2.SOPInstanceUID != ko.SOPInstanceUID and ko2.SeriesInstanceUID == ko.SeriesInstanceUID
    assert ko2.InstanceNumber == review2.id + 1
    assert pydicom.dcmread(v2 / KO_FILE).SOPInstanceUID == ko.SOPInstanceUID


def test_no_rejection_note_when_export_reject_superseded_is_off(
    case: WebCase,  # noqa: F811
) -> None:
    config = case.config.model_copy(
        update={"export": case.config.export.model_copy(update={"reject_superseded": False})}
    )
    l3 = case.result.l3.slice_index
    assert l3 is not None
    _, results = _correct(case, l3 + 1, config=config)
    assert len(version_dirs(results)) == 1
    assert not (results / KO_FILE).exists()
    assert [p.name for p in result_files(results)] == list(MEASUREMENT_FILES)


def test_export_reject_superseded_is_on_by_default() -> None:
    assert Config().export.reject_superseded is True
    assert (
        Config.model_validate({"export": {"reject_superseded": False}}).export.reject_superseded
        is False
    )


def _write(path: Path, study: str, uid: str) -> None:
    """A header-only object of l3spot's SR class (enough for :func:`superseded_objects`)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_a_repeated_task_rejects_the_version_before_its_own_copy(tmp_path: Path) -> None:
    """A re-measure task run twice (its worker died after replacing the folder) keeps a copy
    of its own result as the newest version: that copy is not what it superseded."""
    from worker.outputs.ko import superseded_objects

    study, first, corrected = generate_uid(), generate_uid(), generate_uid()
    _write(tmp_path / "v1" / SR_FILE, study, first)
    _write(tmp_path / "v2" / SR_FILE, study, corrected)  # the repeated task's own copy
    _write(tmp_path / SR_FILE, study, corrected)
    assert [str(ds.SOPInstanceUID) for ds in superseded_objects(tmp_path)] == [first]
    earlier = generate_uid()
    _write(tmp_path / "v2" / SR_FILE, study, earlier)  # a real earlier correction
    assert [str(ds.SOPInstanceUID) for ds in superseded_objects(tmp_path)] == [earlier]
    assert superseded_objects(tmp_path / "v1") == []  # nothing kept: nothing superseded


def test_a_note_needs_objects_of_one_study(tmp_path: Path) -> None:
    from worker.outputs.ko import build_rejection_note
    from worker.outputs.review import Correction

    correction = Correction(3, "dr.ana", "l3spot", 0.0)
    with pytest.raises(ValueError, match="at least one superseded object"):
        build_rejection_note([], correction, "1.2.3")
    a, b = Dataset(), Dataset()
    a.StudyInstanceUID, b.StudyInstanceUID = "1.2.3", "1.2.4"
    with pytest.raises(ValueError, match="2 studies"):
        build_rejection_note([a, b], correction, "1.2.3")
