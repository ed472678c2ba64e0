"""The IHE IOCM rejection note of the objects a reader's correction superseded (issue 17).

DICOM has no "replace": the corrected SEG, SR and SC (:mod:`worker.outputs.review`) are new
instances beside the earlier ones. The standard way to withdraw the earlier ones is a Key
Object Selection Document whose title is DCM 113001 "Rejected for Quality Reasons" (CID 7010)
referencing them (IHE Imaging Object Change Management, IOCM, transaction RAD-66 "Rejection
Note Stored"): a PACS that implements IOCM hides (or deletes) the referenced instances and
stops returning them to queries and viewers; a PACS without IOCM just stores the note.

The note, PS3.3 A.35.4 Key Object Selection Document IOD with TID 2010 content:

* title DCM 113001, with the Document Title Modifier (TID 2010 row 2) DCM 111219
  "Inappropriate image processing" from CID 7011 (the reasons that go with that title):
  the automated processing measured a slice that a reader judged not to be L3;
* the observers: the reader who corrected (person, TID 1003) and l3spot (device, TID 1004);
* a Key Object Description saying which review superseded the objects;
* one reference per superseded object (IMAGE for the SEG and the SC, COMPOSITE for the SR),
  and the same objects, in their series, in the Current Requested Procedure Evidence
  Sequence, which is what IOCM archives read;
* its own series in the study (Series Number :data:`KO_SERIES_NUMBER`), with UIDs derived
  like the others' (:func:`worker.outputs.uids.derived_uid`): a repeated task writes the
  same note.

Built with highdicom's :mod:`highdicom.ko` (it refuses a note without references or with
references to another study).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import (
    CodeContentItem,
    DeviceObserverIdentifyingAttributes,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    RelationshipTypeValues,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from core import ALGORITHM_NAME, __version__
from core.atomic import write_atomically
from core.derived import MANUFACTURER, MANUFACTURER_MODEL_NAME
from core.layout import KO_FILE, MEASUREMENT_FILES, version_dirs
from worker.outputs import codes as c
from worker.outputs.equipment import equipment_attributes
from worker.outputs.review import Correction, person_name
from worker.outputs.uids import derived_uid, device_observer_uid

#: Series Number of the rejection notes (SEG 9701, SR 9702, SC 9703).
KO_SERIES_NUMBER = 9704


def ko_series_description(version: str = __version__) -> str:
    """Series Description of the rejection notes, e.g. ``"Rejected L3 results, superseded
    (l3spot 0.1.0)"`` (at most 64 characters: LO)."""
    return f"Rejected L3 results, superseded ({ALGORITHM_NAME} {version})"


def _headers(folder: Path) -> list[Dataset]:
    """The SEG, SR and SC in ``folder`` (headers only), in :data:`MEASUREMENT_FILES` order."""
    return [
        pydicom.dcmread(folder / name, stop_before_pixels=True)
        for name in MEASUREMENT_FILES
        if (folder / name).is_file()
    ]


def superseded_objects(results_dir: Path) -> list[Dataset]:
    """The objects that the current result of ``results_dir`` superseded.

    Parameters
    ----------
    results_dir : a results folder whose top-level SEG, SR and SC are a correction and whose
        ``v1/``, ``v2/``, ... keep the versions it replaced (:func:`core.layout.version_dirs`).

    Returns
    -------
    list of pydicom.dataset.Dataset
        Headers (no pixel data) of the SEG, SR and SC of the newest kept version, less any
        object that is also current (same SOP Instance UID: a repeated task kept a copy of
        its own result; then the version before it is the one superseded). Empty when no
        earlier version has other objects.

    Notes
    -----
    Only the newest version: the ones before it were rejected by the note sent with it, and
    an IOCM archive may refuse to reject an instance twice.
    """
    current = {str(ds.SOPInstanceUID) for ds in _headers(results_dir)}
    for version in reversed(version_dirs(results_dir)):
        earlier = [ds for ds in _headers(version) if str(ds.SOPInstanceUID) not in current]
        if earlier:
            return earlier
    return []


def build_rejection_note(
    superseded: Sequence[Dataset], correction: Correction, source_series_uid: str
) -> KeyObjectSelectionDocument:
    """The IOCM rejection note ("Rejected for Quality Reasons") of ``superseded``.

    Parameters
    ----------
    superseded : headers of the SEG, SR and SC that the correction replaced
        (:func:`superseded_objects`); Patient and Study come from the first.
    correction : the correction (the reader, the review id: part of the SOP Instance UID).
    source_series_uid : Series Instance UID of the CT series (seed of the derived UIDs).

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        In l3spot's rejection-note series of the study (:data:`KO_SERIES_NUMBER`), Instance
        Number review id + 1, Explicit VR Little Endian.

    Raises
    ------
    ValueError
        ``superseded`` is empty (a note must reference at least one object), or its objects
        belong to more than one study.
    """
    if not superseded:
        raise ValueError(
            f"a rejection note needs at least one superseded object (review {correction.review_id})"
        )
    studies = {str(ds.StudyInstanceUID) for ds in superseded}
    if len(studies) != 1:
        raise ValueError(
            f"the objects superseded by review {correction.review_id} belong to "
            f"{len(studies)} studies; a rejection note references one study"
        )
    person = ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(
            name=str(person_name(correction.user_name)),
            organization_name=correction.organisation[:64] or None,
        ),
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(),
            name=ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER_MODEL_NAME,
        ),
    )
    content = KeyObjectSelection(
        document_title=c.REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=list(superseded),
        observer_person_context=person,
        observer_device_context=device,
        description=(
            f"L3 body composition result superseded by a reader's correction of the L3 slice "
            f"(review {correction.review_id})"
        ),
    )
    # TID 2010 row 2: the Document Title Modifier (CID 7011) comes first under the title
    modifier = CodeContentItem(
        name=c.DOCUMENT_TITLE_MODIFIER,
        value=c.INAPPROPRIATE_IMAGE_PROCESSING,
        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    content[0].ContentSequence.insert(0, modifier)
    return KeyObjectSelectionDocument(
        evidence=list(superseded),
        content=content,
        series_instance_uid=derived_uid(source_series_uid, "ko-series"),
        series_number=KO_SERIES_NUMBER,
        sop_instance_uid=correction.sop_instance_uid(source_series_uid, "ko-instance"),
        instance_number=int(correction.review_id) + 1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=ko_series_description(),
        **equipment_attributes(),
    )


def write_rejection_note(
    results_dir: Path, correction: Correction, source_series_uid: str
) -> Path | None:
    """Write ``results_dir/ko.dcm``: the rejection note of what the correction superseded.

    Parameters
    ----------
    results_dir : the folder of the corrected result, its replaced versions in ``v<N>/``.
    correction : the correction.
    source_series_uid : Series Instance UID of the CT series.

    Returns
    -------
    Path or None
        The note's file (written atomically), or None when nothing was superseded (no
        earlier version with other objects): no note then.
    """
    superseded = superseded_objects(results_dir)
    if not superseded:
        return None
    note = build_rejection_note(superseded, correction, source_series_uid)
    path = results_dir / KO_FILE
    return write_atomically(path, lambda tmp: note.save_as(tmp, enforce_file_format=True))
