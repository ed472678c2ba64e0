"""Deterministic UIDs for the derived objects (SEG, SR, SC, and the KOS rejection note).

A re-run of the same algorithm version on the same source series must *replace* its results
in the PACS, never duplicate them, so every derived UID is a pure function of the source
Series Instance UID, the algorithm name and version, and the object kind. The UIDs use the
``2.25`` root with a name-based UUID (ISO/IEC 9834-8 / RFC 4122 version 5, PS3.5 B.2) of
those inputs (:func:`worker.volume.write.deterministic_uid`, the one UID function of l3spot).
"""

from __future__ import annotations

from typing import Literal

from core import ALGORITHM_NAME, __version__
from worker.volume.write import deterministic_uid

#: Object kinds and the parts of them that carry a UID.
DerivedKind = Literal[
    "seg-series",
    "seg-instance",
    "sr-series",
    "sr-instance",
    "sc-series",
    "sc-instance",
    "ko-series",
    "ko-instance",
    "device-observer",
]


def derived_uid(
    source_series_uid: str,
    kind: str,
    *extra: str,
    version: str = __version__,
) -> str:
    """A UID that depends only on the source series, the algorithm version and ``kind``.

    Parameters
    ----------
    source_series_uid : Series Instance UID of the analysed CT series.
    kind : what the UID identifies, e.g. ``"seg-series"`` (see :data:`DerivedKind`), or a
        free label such as ``"tracking"`` for tracking UIDs inside the SR.
    *extra : further discriminators (e.g. the compartment key of a tracking UID).
    version : algorithm version; a new version produces new objects rather than
        overwriting the results of an older one.

    Returns
    -------
    str
        A ``2.25.<decimal>`` UID of at most 64 characters (PS3.5 9.1).

    Raises
    ------
    ValueError
        ``source_series_uid`` or ``kind`` is empty: a UID derived from nothing would collide
        between series.
    """
    if not source_series_uid:
        raise ValueError("a derived UID needs the source Series Instance UID")
    if not kind:
        raise ValueError("a derived UID needs an object kind")
    return _uid_from_parts(ALGORITHM_NAME, version, source_series_uid, kind, *extra)


def device_observer_uid(version: str = __version__) -> str:
    """Device Observer UID (TID 1004) of this l3spot version: same on every node."""
    return _uid_from_parts(ALGORITHM_NAME, version, "device-observer")


def _uid_from_parts(*parts: str) -> str:
    """``2.25.<int of a version-5 UUID of the parts>`` (:func:`deterministic_uid`)."""
    return deterministic_uid(*parts)
