"""The error tree: every exception l3spot defines derives from :class:`L3SpotError`.

Each error carries the Series Instance UID (and the Study Instance UID where one is known)
it concerns as attributes, never patient data, so a handler can record it in the job
record or a log line without parsing the message. Errors that code elsewhere catches as a
builtin type also derive from that type (``ConfigError`` is a ``ValueError``,
``JobNotFoundError`` a ``KeyError``, ``SpoolWriteError`` in :mod:`service.spool` an
``OSError``), so ``except ValueError`` and the like keep working.

Errors shared by both processes live here; errors that only one module raises live in that
module (:mod:`service.spool`, :mod:`service.requeue`, :mod:`worker.locator.coarse`, ...)
and derive from :class:`L3SpotError` too (``tests/unit/test_errors.py`` checks every
module).

The tree::

    L3SpotError
    ├── ConfigError (ValueError)              the configuration file or an override is invalid
    ├── JobNotFoundError (KeyError)           no job record for a Series Instance UID
    ├── MalformedDatasetError (ValueError)    an encoded data set is not well-formed (PS3.5 7)
    ├── NetPatchError (RuntimeError)          a pynetdicom patch cannot attach (core.netpatch)
    ├── StartupError                          a process cannot start (port in use, folder)
    ├── SeriesValidationError                 a series cannot become a valid CT volume
    │   ├── NotCTError, MixedSeriesError, NonAxialError, GantryTiltError,
    │   ├── InconsistentGeometryError, DuplicatePositionError, SliceGapError,
    │   └── TooFewSlicesError, MissingIdentifierError, UnreadableFileError
    └── AnalysisError                         a loaded series could not be analysed
"""

from __future__ import annotations

import re

__all__ = [
    "AnalysisError",
    "ConfigError",
    "DuplicatePositionError",
    "GantryTiltError",
    "InconsistentGeometryError",
    "JobNotFoundError",
    "L3SpotError",
    "MalformedDatasetError",
    "MissingIdentifierError",
    "MixedSeriesError",
    "NetPatchError",
    "NonAxialError",
    "NotCTError",
    "SeriesValidationError",
    "SliceGapError",
    "StartupError",
    "TooFewSlicesError",
    "UnreadableFileError",
]


class L3SpotError(Exception):
    """Base class of every error l3spot raises on purpose.

    Parameters
    ----------
    *args : the message (passed on to the builtin base, e.g. ``OSError(errno, strerror)``).
    series_uid : Series Instance UID the error concerns ("" when none or unknown).
    study_uid : Study Instance UID the error concerns ("" when none or unknown).

    Attributes
    ----------
    series_uid, study_uid : as given; class defaults are "" so every instance has them.
    """

    series_uid: str = ""
    study_uid: str = ""

    def __init__(self, *args: object, series_uid: str = "", study_uid: str = "") -> None:
        super().__init__(*args)
        self.series_uid = series_uid
        self.study_uid = study_uid


class ConfigError(L3SpotError, ValueError):
    """The configuration file or an environment override is invalid."""


class JobNotFoundError(L3SpotError, KeyError):
    """No job record for this Series Instance UID."""

    def __init__(self, series_uid: str) -> None:
        super().__init__(f"no job record for series {series_uid}", series_uid=series_uid)


class MalformedDatasetError(L3SpotError, ValueError):
    """The encoded data set is not well-formed (the reason says where and why).

    Raised by the element walker of :mod:`core.dicom` for truncated elements, lengths that
    run past their container, unknown VRs, unordered tags, bad nesting (PS3.5 section 7).
    """


class NetPatchError(L3SpotError, RuntimeError):
    """A patch of :mod:`core.netpatch` cannot attach to the installed pynetdicom."""


class StartupError(L3SpotError):
    """The node or a worker cannot start: a port it cannot listen on, a folder it cannot write.

    The message names what is wrong and where (``cannot listen on 0.0.0.0:11112: address
    already in use``, ``node.spool_dir /var/spool: cannot write: permission denied``): the
    command line reports it as one line, not a traceback.
    """


class SeriesValidationError(L3SpotError):
    """A series cannot be turned into a valid CT volume.

    Parameters
    ----------
    series_uid : Series Instance UID ("" when the input has none).
    reason : what is wrong, in the standard's terms (e.g. "gantry tilt of 15.0 degrees").
    study_uid : Study Instance UID when known.
    """

    def __init__(self, series_uid: str, reason: str, study_uid: str = "") -> None:
        self.reason = reason
        super().__init__(
            f"series {series_uid or '<no Series Instance UID>'}: {reason}",
            series_uid=series_uid,
            study_uid=study_uid,
        )


class NotCTError(SeriesValidationError):
    """The series is not a single-frame grayscale CT image series (modality, SOP class)."""


class MixedSeriesError(SeriesValidationError):
    """The folder holds images of more than one series (or study)."""


class NonAxialError(SeriesValidationError):
    """The images are not axial slices (sagittal, coronal, oblique, localizer)."""


class GantryTiltError(SeriesValidationError):
    """The slices were acquired with gantry tilt: the stack is sheared."""


class InconsistentGeometryError(SeriesValidationError):
    """Rows, columns, pixel spacing, orientation or frame of reference differ or are missing."""


class DuplicatePositionError(SeriesValidationError):
    """Several slices with different pixels share one position."""


class SliceGapError(SeriesValidationError):
    """A step between consecutive slices is larger than allowed (missing slices)."""


class TooFewSlicesError(SeriesValidationError):
    """Fewer slices than the configured minimum (or none at all)."""


class MissingIdentifierError(SeriesValidationError):
    """An image has an empty SOP Instance, Study Instance or Series Instance UID."""


class UnreadableFileError(SeriesValidationError):
    """A DICOM file of the series cannot be parsed or its pixels cannot be decoded."""


class NotHounsfieldError(SeriesValidationError):
    """The values cannot be read as CT Hounsfield units: Rescale Slope/Intercept absent, not
    finite or a zero slope (PS3.3 C.11.1.1.2), or the volume's histogram is not that of a CT
    in HU (air near -1000, fat near -100, soft tissue near +40)."""


class AnalysisError(L3SpotError):
    """A loaded series could not be analysed (locator or composition failed).

    Parameters
    ----------
    series_uid : Series Instance UID.
    stage : the pipeline stage that failed ("locator", "composition", ...).
    reason : what went wrong.
    study_uid : Study Instance UID when known.
    """

    def __init__(self, series_uid: str, stage: str, reason: str, study_uid: str = "") -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(
            f"series {series_uid or '<no Series Instance UID>'}: {stage}: {reason}",
            series_uid=series_uid,
            study_uid=study_uid,
        )


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: Unquoted dates (1950-01-02, 1950/1/2, 19500102) in a library message: redacted as well.
_DATE_LIKE = re.compile(r"\b\d{4}[-./]\d{1,2}[-./]\d{1,2}\b|\b(?:18|19|20)\d{6}\b")


def phi_safe_message(exc: BaseException) -> str:
    """``Type: message`` of a library exception with every quoted value replaced by ``'…'``.

    Library messages quote the offending value (pydicom: ``Unable to convert '1950-01-02' to
    'DA'``), which may be patient data; job records, logs and web pages get this form.
    Unquoted date-like numbers are replaced too.
    """
    text = _DATE_LIKE.sub("…", _QUOTED.sub("'…'", str(exc)))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
