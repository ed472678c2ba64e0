"""Which stored series are worth analysing: axial CT with enough slices, no localizers.

Everything is stored; only eligible series are queued. An ineligible series gets a job
record with the reason (so an operator can see why nothing came back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from core.config import NodeConfig
from core.errors import SeriesValidationError
from core.series_rules import (
    CT_IMAGE_STORAGE,
    MAX_OBLIQUITY_DEG,
    check_axial_geometry,
    check_slice_count,
    is_analysed_image,
    is_localizer,
)
from service.spool import instance_files

__all__ = ["CT_IMAGE_STORAGE", "MAX_OBLIQUITY_DEG", "Eligibility", "check_series"]

_HEADER_TAGS = [
    "SOPClassUID",
    "Modality",
    "ImageType",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "GantryDetectorTilt",
    "SeriesDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
]


@dataclass(frozen=True)
class Eligibility:
    """Verdict on one series folder.

    Attributes
    ----------
    eligible : analyse it.
    reason : why not (empty when eligible).
    n_instances : files in the folder.
    n_images : CT Image Storage instances among them (the slices the pipeline will load).
    """

    eligible: bool
    reason: str
    n_instances: int
    n_images: int


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a DS value, or None when absent or malformed."""
    try:
        v = tuple(float(x) for x in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(v) != n or not all(np.isfinite(v)):
        return None
    return v


def _geometry_reason(series_uid: str, images: list[Dataset]) -> str | None:
    """Why the images are not an axial stack (:func:`core.series_rules.check_axial_geometry`,
    the loader's rule and reason), or None."""
    orientations = [_floats(h.get("ImageOrientationPatient"), 6) for h in images]
    if any(o is None for o in orientations):
        return "not an axial series (ImageOrientationPatient missing or invalid)"
    tilts = [_floats([h.get("GantryDetectorTilt", 0) or 0], 1) for h in images]
    tilt = max((t[0] for t in tilts if t is not None), key=abs, default=0.0)
    by_orientation: dict[tuple[float, ...], list[tuple[float, ...]]] = {}
    for h, o in zip(images, orientations, strict=True):
        position = _floats(h.get("ImagePositionPatient"), 3)
        stack = by_orientation.setdefault(o, [])  # type: ignore[arg-type]
        if position is not None:
            stack.append(position)
    try:
        for orientation, positions in by_orientation.items():
            check_axial_geometry(
                series_uid, orientation, np.array(positions, dtype=np.float64).reshape(-1, 3), tilt
            )
    except SeriesValidationError as exc:
        return exc.reason
    return None


def check_series(series_dir: Path, node: NodeConfig) -> Eligibility:
    """Decide whether a complete series folder should be analysed.

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>`` folder.
    node : ``node`` section of the configuration (``min_slices``,
        ``series_description_regex``).

    Returns
    -------
    Eligibility
        Rules, in order: modality CT, CT Image Storage SOP class, not a LOCALIZER
        (ImageType value 3, PS3.3 C.8.2.1.1.1), an axial stack (slice normal within
        :data:`core.series_rules.MAX_OBLIQUITY_DEG` of the patient z axis, positions
        stepping along the normal: no gantry tilt), at least ``min_slices`` images,
        SeriesDescription matching ``series_description_regex`` when set. The geometry
        and count rules are those of the loader (:mod:`core.series_rules`), with the
        loader's reasons, so a queued series is not refused by the worker for them.
    """
    files = instance_files(series_dir)
    n = len(files)
    headers = []
    for path in files:
        try:
            headers.append(
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
    images = [
        h
        for h in headers
        if is_analysed_image(str(h.get("SOPClassUID", "")), str(h.get("Modality", "")))
    ]
    if not images:
        modalities = sorted({str(h.get("Modality", "?")) for h in headers}) or ["unreadable"]
        return Eligibility(
            False, f"no CT Image Storage instances (modality {', '.join(modalities)})", n, 0
        )
    localizers = [h for h in images if is_localizer(h.get("ImageType", []))]
    if len(localizers) == len(images):
        return Eligibility(False, "LOCALIZER series (scout image)", n, len(images))
    images = [h for h in images if h not in localizers]
    series_uid = str(images[0].get("SeriesInstanceUID", "")) or series_dir.name
    reason = _geometry_reason(series_uid, images)
    if reason is not None:
        return Eligibility(False, reason, n, len(images))
    try:
        check_slice_count(
            series_uid, len(images), node.min_slices, "the series", setting="node.min_slices"
        )
    except SeriesValidationError as exc:
        return Eligibility(False, exc.reason, n, len(images))
    if node.series_description_regex:
        desc = str(images[0].get("SeriesDescription", ""))
        if re.search(node.series_description_regex, desc) is None:
            return Eligibility(
                False,
                "SeriesDescription does not match node.series_description_regex",
                n,
                len(images),
            )
    return Eligibility(True, "", n, len(images))
