"""Finding every CT series in an export folder (``l3spot analyze`` on nested folders).

Exports come as PATIENT/STUDY/SERIES trees, as flat folders mixing several series, or as a
DICOM File-set with a DICOMDIR (PS3.10 section 8, PS3.3 F). :func:`find_series` reads only
the headers (pydicom ``stop_before_pixels`` and ``specific_tags``), groups the files by
Series Instance UID and decides, with the same series rules as the node's eligibility and
the loader (:mod:`core.series_rules`), which groups are CT image series to analyse; every
other group is reported with its reason (an SR, a SEG, a localizer). NIfTI files met on the
way are inputs too.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from core.errors import phi_safe_message
from core.series_rules import ANALYSED_SOP_CLASSES, CT_MODALITY, is_analysed_image, is_localizer
from worker.volume.load import is_nifti

__all__ = ["DICOMDIR_SOP_CLASS", "Discovery", "FoundSeries", "SkippedSeries", "find_series"]

#: Media Storage Directory Storage (PS3.4 Annex I): the SOP class of a DICOMDIR.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: The only attributes read from each file (the rest of the header is skipped).
HEADER_TAGS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "SeriesDescription",
    "SeriesNumber",
)


@dataclass(frozen=True)
class FoundSeries:
    """One CT image series to analyse.

    Attributes
    ----------
    series_instance_uid : "" when the files have none (the loader then refuses the series
        with the reason; such files are grouped by folder).
    study_instance_uid, series_description, series_number : from the first file.
    folder : the deepest folder holding all its files.
    files : the series' files, sorted; a list because a folder may hold several series.
    notes : what was left out of the series and why (localizer images, non-image objects).
    """

    series_instance_uid: str
    study_instance_uid: str
    series_description: str
    series_number: int | None
    folder: Path
    files: tuple[Path, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedSeries:
    """A group of files with one Series Instance UID that is not analysed, and why."""

    series_instance_uid: str
    folder: Path
    n_files: int
    modality: str
    reason: str


@dataclass
class Discovery:
    """What :func:`find_series` found under a folder.

    Attributes
    ----------
    series : the CT image series, sorted by folder and Series Number.
    nifti : NIfTI files (each one volume to analyse).
    skipped : series that are not analysed, each with its reason.
    notes : other findings (files that are not DICOM, DICOMDIR entries whose file is
        missing, unreadable headers).
    """

    series: list[FoundSeries] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)
    skipped: list[SkippedSeries] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    description: str = ""
    series_number: int | None = None
    not_dicom: bool = False
    dicomdir: bool = False
    unreadable: str | None = None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _read(path: Path) -> _Header:
    """The grouping attributes of one file, without its pixel data."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except InvalidDicomError:
        return _Header(path, not_dicom=True)
    except Exception as exc:  # a Part 10 file whose header cannot be parsed
        return _Header(path, unreadable=phi_safe_message(exc))
    meta = getattr(ds, "file_meta", None)
    meta_class = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta else ""
    if meta_class == DICOMDIR_SOP_CLASS:
        return _Header(path, dicomdir=True)
    try:
        image_type = ds.get("ImageType") or ()
        image_type = (image_type,) if isinstance(image_type, str) else tuple(image_type)
        number = ds.get("SeriesNumber")
        if not _text(ds, "SeriesInstanceUID") and not _text(ds, "Modality"):
            # a Part 10 file cut short (pydicom stops quietly at the end of the data)
            return _Header(path, unreadable="no Series Instance UID and no Modality (truncated?)")
        return _Header(
            path,
            sop_class_uid=_text(ds, "SOPClassUID") or meta_class,
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality").upper(),
            image_type=tuple(str(v).strip().upper() for v in image_type),
            description=_text(ds, "SeriesDescription"),
            series_number=int(number) if number not in (None, "") else None,
        )
    except Exception as exc:  # a malformed value (e.g. Series Number "abc")
        return _Header(path, unreadable=phi_safe_message(exc))


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _fileset_files(dicomdir: Path, notes: list[str]) -> list[Path]:
    """The files a DICOMDIR references (pydicom's FileSet), noting those that are missing."""
    from pydicom.fileset import FileSet

    try:
        ds = pydicom.dcmread(dicomdir)
        with warnings.catch_warnings():  # FileSet warns of each missing file: counted below
            warnings.simplefilter("ignore")
            fs = FileSet(ds)
    except Exception as exc:
        notes.append(f"{dicomdir}: DICOMDIR not readable ({phi_safe_message(exc)})")
        return []
    files = [Path(inst.path) for inst in fs if Path(inst.path).is_file()]
    listed = sum(
        1 for r in ds.get("DirectoryRecordSequence", []) if r.get("ReferencedFileID") is not None
    )
    missing = listed - len(files)
    notes.append(
        f"{dicomdir}: DICOMDIR lists {listed} instance(s)"
        + (f", {missing} of them missing" if missing > 0 else "")
    )
    return files


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else "<empty>"
    return name if name and name != uid else uid or "<empty>"


def _common_folder(paths: Iterable[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _classify(
    heads: list[_Header], unreadable: list[_Header], found: Discovery, folder: Path
) -> None:
    """Add one Series Instance UID group to ``found.series`` or ``found.skipped``."""
    first = heads[0]
    images = [h for h in heads if is_analysed_image(h.sop_class_uid, h.modality)]
    if not images:
        modalities = "/".join(sorted({h.modality or "<empty>" for h in heads}))
        classes = ", ".join(sorted({_sop_name(h.sop_class_uid) for h in heads}))
        why = f"Modality {modalities} ({classes}): not a CT image series"
        if CT_MODALITY in modalities.split("/"):
            why = (
                f"{classes}: only single-frame CT Image Storage "
                f"({', '.join(sorted(ANALYSED_SOP_CLASSES))}) is analysed"
            )
        found.skipped.append(SkippedSeries(first.series_uid, folder, len(heads), modalities, why))
        return
    notes: list[str] = []
    if len(images) < len(heads):
        notes.append(f"left out {len(heads) - len(images)} instance(s) that are not CT images")
    axial = [h for h in images if not is_localizer(h.image_type)]
    if not axial:
        found.skipped.append(
            SkippedSeries(
                first.series_uid,
                folder,
                len(heads),
                CT_MODALITY,
                f"localizer (Image Type {'/'.join(images[0].image_type)}): not axial slices",
            )
        )
        return
    if len(axial) < len(images):
        notes.append(f"left out {len(images) - len(axial)} localizer image(s)")
    files = [h.path for h in axial]
    broken = [h.path for h in unreadable if h.path.parent in {p.parent for p in files}]
    if broken:  # never a silently missing slice: the loader refuses the series with the file
        notes.append(f"{len(broken)} unreadable DICOM file(s) in its folder kept with it")
        files += broken
    ref = axial[0]
    found.series.append(
        FoundSeries(
            series_instance_uid=ref.series_uid,
            study_instance_uid=ref.study_uid,
            series_description=ref.description,
            series_number=ref.series_number,
            folder=_common_folder(files),
            files=tuple(sorted(files)),
            notes=tuple(notes),
        )
    )


def find_series(root: Path | str, *, workers: int | None = None) -> Discovery:
    """Every CT image series (and NIfTI file) under ``root``, by reading headers only.

    Parameters
    ----------
    root : a folder (searched recursively: PATIENT/STUDY/SERIES trees, flat folders of
        several series, DICOM File-sets), a DICOMDIR file (its referenced files only) or a
        NIfTI file.
    workers : header-reading threads (default: up to 8).

    Returns
    -------
    Discovery
        Files grouped by Series Instance UID (files with none: by folder). A group is a
        series to analyse when it holds single-frame CT Image Storage instances with
        Modality CT (:func:`core.series_rules.is_analysed_image`) that are not localizers
        (:func:`core.series_rules.is_localizer`); other instances of the group are left out
        with a note. Every other group is in ``skipped`` with its reason. A DICOM file whose
        header cannot be parsed stays with the series of its folder, so that the loader
        refuses that series rather than analyse it with a slice missing.

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist.
    """
    root = Path(root)
    found = Discovery()
    if root.is_file():
        if is_nifti(root):
            found.nifti.append(root)
            return found
        candidates = _fileset_files(root, found.notes)
    elif root.is_dir():
        candidates = []
        for p in _walk(root):
            if is_nifti(p):
                found.nifti.append(p)
            elif p.name.upper() == "DICOMDIR":
                _fileset_files(p, found.notes)  # checks it; its files are in the walk
            else:
                candidates.append(p)
    else:
        raise FileNotFoundError(f"no such folder or file: {root}")

    n = workers or min(8, 2 * (os.cpu_count() or 2))
    if n > 1 and len(candidates) >= 16:
        with ThreadPoolExecutor(max_workers=n) as pool:
            heads = list(pool.map(_read, candidates))
    else:
        heads = [_read(p) for p in candidates]

    not_dicom = [h for h in heads if h.not_dicom]
    if not_dicom:
        found.notes.append(
            f"ignored {len(not_dicom)} file(s) that are not DICOM (e.g. {not_dicom[0].path.name})"
        )
    unreadable = [h for h in heads if h.unreadable]
    groups: dict[tuple[str, str], list[_Header]] = defaultdict(list)
    for h in heads:
        if h.not_dicom or h.dicomdir or h.unreadable:
            continue
        key = (h.series_uid, "") if h.series_uid else ("", str(h.path.parent))
        groups[key].append(h)
    for heads_of in groups.values():
        _classify(heads_of, unreadable, found, _common_folder(h.path for h in heads_of))
    kept = {p for s in found.series for p in s.files}
    lost = [h for h in unreadable if h.path not in kept]
    if lost:
        found.notes.append(
            f"{len(lost)} DICOM file(s) with an unreadable header and no series beside them "
            f"(e.g. {lost[0].path.name}: {lost[0].unreadable})"
        )
    found.series.sort(key=lambda s: (str(s.folder), s.series_number or 0, s.series_instance_uid))
    found.skipped.sort(key=lambda s: (str(s.folder), s.series_instance_uid))
    found.nifti.sort()
    return found
