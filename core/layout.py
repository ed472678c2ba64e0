"""The result-folder layout: where one series' results live and what their files are called.

The worker writes these files (:mod:`worker.pipeline`), the export task sends the DICOM ones
(:mod:`worker.export`), the node re-queues an export when they exist (:mod:`service.requeue`)
and the web page shows them (:mod:`service.web.views`); this module is the one place that
names them.

``<results_dir>/<SeriesInstanceUID>/``:

=========================  =================================================================
``result.json``            the record of the analysis (:class:`core.result.AnalysisResult`)
``seg.dcm``                DICOM SEG (SMA, IMAT, VAT, SAT on the L3 image)
``sr.dcm``                 TID 1500 Comprehensive 3D SR
``sc.dcm``                 RGB Secondary Capture (L3 slice with masks, MIP with the L3 line)
``ko.dcm``                 after a reader's correction: the IHE IOCM rejection note (Key
                           Object Selection "Rejected for Quality Reasons") of the objects
                           it superseded (``export.reject_superseded``)
``overview.png``           the same picture as the SC, for the web page
``observation.fhir.json``  the measurements as a FHIR R4 Observation (when measured)
``locator_mips.npz``       the frontal MIPs at the locator models' pixel sizes: what the
                           locator learns from when a reader reviews the result (issue 17,
                           :mod:`worker.training.reviews`); not sent to the PACS
``source/``                NIfTI inputs only: the CT series written from the NIfTI
``v1/``, ``v2/``, ...      earlier versions of the files above, kept when a reader's
                           correction replaced them (issue 17; ``v1`` the oldest)
=========================  =================================================================
"""

from __future__ import annotations

from pathlib import Path

RESULT_JSON = "result.json"
SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
SC_FILE = "sc.dcm"
#: IHE IOCM rejection note of the objects a correction superseded (worker/outputs/ko.py).
KO_FILE = "ko.dcm"
OVERVIEW_FILE = "overview.png"
SOURCE_DIR = "source"
#: The FHIR R4 Observation of the measurements (not a DICOM object: not sent to the PACS).
FHIR_OBSERVATION_FILE = "observation.fhir.json"

#: The frontal MIPs a reviewed result teaches the locator with (no patient identifiers).
LOCATOR_MIPS_FILE = "locator_mips.npz"

#: The objects of one analysis (a rejection note rejects these of the version it supersedes).
MEASUREMENT_FILES = (SEG_FILE, SR_FILE, SC_FILE)
#: The DICOM objects sent to the PACS, in the order they are sent: the rejection note last,
#: after the objects that replace the ones it rejects (IHE IOCM).
RESULT_FILES = (*MEASUREMENT_FILES, KO_FILE)


def series_results_dir(results_root: Path, series_uid: str) -> Path:
    """``results_root/<series_uid>``: the folder of one series' results."""
    return results_root / series_uid


#: Prefix of the folders that keep superseded versions of a result (``v1``, ``v2``, ...).
VERSION_PREFIX = "v"


def version_dirs(results_dir: Path) -> list[Path]:
    """The superseded versions kept in ``results_dir`` (``v1``, ``v2``, ...), oldest first."""
    if not results_dir.is_dir():
        return []
    found = [
        p
        for p in results_dir.iterdir()
        if p.is_dir() and p.name.startswith(VERSION_PREFIX) and p.name[1:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[1:]))


def next_version_dir(results_dir: Path) -> Path:
    """Where the current files of ``results_dir`` go when a correction replaces them."""
    kept = version_dirs(results_dir)
    n = int(kept[-1].name[1:]) + 1 if kept else 1
    return results_dir / f"{VERSION_PREFIX}{n}"


def result_files(results_dir: Path) -> list[Path]:
    """The result objects present in ``results_dir``, in :data:`RESULT_FILES` order."""
    return [results_dir / n for n in RESULT_FILES if (results_dir / n).is_file()]
