"""A reader's correction: the corrected SEG, SR and SC replace the earlier ones (issue 17).

When a reader chooses another slice as L3 on the web page, the worker measures again at that
slice (:func:`worker.pipeline.analyze_series` with ``l3_slice_index``) and writes new
objects in the same series as the earlier ones, with new SOP Instance UIDs derived from the
source series and the review's id (a repeated task writes the same objects again). The SR
is the reader's document now:

* Completion Flag ``COMPLETE``, Verification Flag ``VERIFIED`` and the Verifying Observer
  Sequence (the reader's name, the organisation ``web.review_organisation``, the time of
  the decision): PS3.3 C.17.2 SR Document General Module;
* the Predecessor Documents Sequence referencing the SR it supersedes (PS3.3 C.17.2.3,
  "Hierarchical SOP Instance Reference Macro").

docs/review.md says how PACS and viewers treat such a newer SR.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from worker.outputs.uids import derived_uid


@dataclass(frozen=True)
class PriorDocument:
    """The SR a correction supersedes (from the earlier ``sr.dcm``)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, sr: Dataset) -> PriorDocument:
        """The reference to an SR dataset."""
        return cls(
            str(sr.StudyInstanceUID),
            str(sr.SeriesInstanceUID),
            str(sr.SOPClassUID),
            str(sr.SOPInstanceUID),
        )


@dataclass(frozen=True)
class Correction:
    """Who corrected a result, when, and what the correction supersedes.

    Attributes
    ----------
    review_id : the ``reviews`` row (:class:`core.jobs.ReviewRecord`); part of the UIDs.
    user_name : the reader (Verifying Observer Name).
    organisation : Verifying Organization (``web.review_organisation``).
    verified_at : Unix time (s) of the reader's decision (Verification DateTime).
    prior : the superseded SR, or None when there was none (no predecessor reference).
    """

    review_id: int
    user_name: str
    organisation: str
    verified_at: float
    prior: PriorDocument | None = None

    def sop_instance_uid(self, source_series_uid: str, kind: str) -> str:
        """The corrected object's SOP Instance UID: the source series, ``kind`` (e.g.
        ``"sr-instance"``) and the review id; the same for a repeated task."""
        return derived_uid(source_series_uid, kind, f"review-{self.review_id}")


def _set_sop_instance_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = uid


def renumber(ds: Dataset, correction: Correction, source_series_uid: str, kind: str) -> None:
    """Give a corrected SEG or SC its new SOP Instance UID (same series, next instance).

    Parameters
    ----------
    ds : the object built for the corrected slice.
    correction : the correction.
    source_series_uid : Series Instance UID of the CT series.
    kind : ``"seg-instance"``, ``"sc-instance"`` or ``"sr-instance"``.
    """
    _set_sop_instance_uid(ds, correction.sop_instance_uid(source_series_uid, kind))
    ds.InstanceNumber = int(correction.review_id) + 1


def person_name(user: str) -> PersonName:
    """A user name as the family-name component of a Person Name (PS3.5 6.2: at most 64
    characters per group; no ``\\``, ``=`` or ``^`` inside it). The ``^`` after it marks
    the component (without it, dciodvfy reads a name with a space or a dot as the retired
    free-text form)."""
    clean = "".join(ch for ch in user if ch.isprintable() and ch not in "\\=^")[:63]
    return PersonName(f"{clean or 'unknown'}^")


def mark_verified(sr: Dataset, correction: Correction, source_series_uid: str) -> None:
    """Turn a built SR into the reader's verified, corrected document.

    Parameters
    ----------
    sr : the SR built for the corrected slice (:func:`worker.outputs.sr.build_sr`).
    correction : who verified it, when, and the SR it supersedes.
    source_series_uid : Series Instance UID of the CT series.

    Notes
    -----
    PS3.3 C.17.2 (SR Document General Module): Verification Flag ``VERIFIED`` requires the
    Verifying Observer Sequence (Verifying Observer Name, Verifying Organization,
    Verification DateTime; Verifying Observer Identification Code Sequence is type 2, empty
    here: no coded identity of the reader). The Predecessor Documents Sequence (type 1C)
    references the superseded SR by Study, Series and SOP Instance.
    """
    renumber(sr, correction, source_series_uid, "sr-instance")
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "VERIFIED"
    sr.PreliminaryFlag = "FINAL"
    observer = Dataset()
    observer.VerifyingObserverName = person_name(correction.user_name)
    observer.VerifyingOrganization = correction.organisation[:64]
    observer.VerificationDateTime = datetime.fromtimestamp(correction.verified_at, UTC).strftime(
        "%Y%m%d%H%M%S+0000"
    )
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    sr.VerifyingObserverSequence = Sequence([observer])
    if correction.prior is not None:
        p = correction.prior
        ref = Dataset()
        ref.ReferencedSOPClassUID = p.sop_class_uid
        ref.ReferencedSOPInstanceUID = p.sop_instance_uid
        series = Dataset()
        series.SeriesInstanceUID = p.series_instance_uid
        series.ReferencedSOPSequence = Sequence([ref])
        study = Dataset()
        study.StudyInstanceUID = p.study_instance_uid
        study.ReferencedSeriesSequence = Sequence([series])
        sr.PredecessorDocumentsSequence = Sequence([study])
