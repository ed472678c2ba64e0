"""Exception types. Each carries the Series Instance UID it concerns, never patient data."""

from __future__ import annotations


class L3SpotError(Exception):
    """Base class of every error l3spot raises on purpose."""


class SeriesValidationError(L3SpotError):
    """A series cannot be turned into a valid CT volume.

    Parameters
    ----------
    series_uid : Series Instance UID ("" when the input has none).
    reason : what is wrong, in the standard's terms (e.g. "gantry tilt of 15.0 degrees").
    """

    def __init__(self, series_uid: str, reason: str) -> None:
        self.series_uid = series_uid
        self.reason = reason
        super().__init__(f"series {series_uid or '<no Series Instance UID>'}: {reason}")


class AnalysisError(L3SpotError):
    """A loaded series could not be analysed (locator or composition failed)."""

    def __init__(self, series_uid: str, stage: str, reason: str) -> None:
        self.series_uid = series_uid
        self.stage = stage
        self.reason = reason
        super().__init__(f"series {series_uid or '<no Series Instance UID>'}: {stage}: {reason}")
