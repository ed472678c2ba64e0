"""The series rules that the node's eligibility and the worker's loader both apply.

One rule, one place: :mod:`service.eligibility` decides whether a stored series is queued
and :mod:`worker.volume.load` validates it before analysis; both call these functions, so a
series the node queues is never refused by the worker for a reason the node could have
seen (for example a slice normal 7 degrees from the head-foot axis: eligibility used to
allow 10 degrees, the loader 5). A rule that fails raises a
:class:`core.errors.SeriesValidationError` subclass whose ``reason`` is what both the
eligibility verdict and the failed job record say.

Geometry follows PS3.3 C.7.6.2 (Image Plane module): Image Orientation (Patient) gives the
row and column direction cosines in the patient (LPS) system, Image Position (Patient)
the centre of the first voxel in mm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from core.errors import (
    GantryTiltError,
    InconsistentGeometryError,
    NonAxialError,
    SliceGapError,
    TooFewSlicesError,
)

__all__ = [
    "ANALYSED_SOP_CLASSES",
    "CT_IMAGE_CLASSES",
    "CT_IMAGE_STORAGE",
    "CT_MODALITY",
    "DUPLICATE_TOLERANCE_MM",
    "MAX_OBLIQUITY_DEG",
    "MAX_SHEAR_DEG",
    "axial_obliquity_deg",
    "check_axial_geometry",
    "check_slice_count",
    "check_slice_gaps",
    "is_analysed_image",
    "is_localizer",
    "slice_normal",
]

#: CT Image Storage (PS3.4 Annex B.5): the only SOP class analysed (single-frame slices).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: SOP classes a series must consist of to be analysed. Enhanced CT (multi-frame) is
#: stored but not analysed.
ANALYSED_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE})
#: CT image SOP classes whose instances must carry pixel data (PS3.3 A.3 CT Image, A.38
#: Enhanced CT, A.70 Legacy Converted Enhanced CT: Image Pixel module, Type 1 attributes);
#: the node's structural check (:mod:`service.validate`) requires the pixel attributes.
CT_IMAGE_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)
#: Modality (0008,0060) of an analysed series (PS3.3 C.7.3.1.1.1).
CT_MODALITY = "CT"

#: Largest angle (degrees) between the slice normal and the head-foot axis of an axial
#: series. The frontal MIP and the composition rules assume axial slices; 5 degrees keeps
#: the error of treating an oblique slice as axial under 0.4 % (1 - cos 5 degrees).
MAX_OBLIQUITY_DEG = 5.0
#: Largest angle (degrees) between the slice normal and the stacking direction before the
#: stack counts as sheared (gantry tilt): tilted stacks are not resampled.
MAX_SHEAR_DEG = 0.5
#: Positions closer than this (mm) along the normal are the same position.
DUPLICATE_TOLERANCE_MM = 0.01


def is_analysed_image(sop_class_uid: str, modality: str) -> bool:
    """True for a CT Image Storage instance with Modality CT (what the pipeline loads)."""
    return sop_class_uid in ANALYSED_SOP_CLASSES and modality.strip().upper() == CT_MODALITY


def is_localizer(image_type: Iterable[str] | str) -> bool:
    """True when Image Type (0008,0008) names a LOCALIZER (scout) image (PS3.3 C.8.2.1.1.1).

    ``image_type`` is the values, or the backslash-separated string of one.
    """
    values = image_type.split("\\") if isinstance(image_type, str) else image_type
    return "LOCALIZER" in (str(v).strip().upper() for v in values)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal ``row x column`` cosines, its sign chosen to point to the head.

    Parameters
    ----------
    orientation : Image Orientation (Patient), six direction cosines (row x, y, z, column
        x, y, z) in the patient LPS system (PS3.3 C.7.6.2.1.1).

    Returns
    -------
    (3,) float64 unit vector (LPS). The sign is flipped when the cross product points to
    the feet (negative patient z), so that ascending z along the normal always runs
    inferior -> superior.

    Raises
    ------
    ValueError
        The orientation does not have six values or its vectors are parallel or null.
    """
    o = np.asarray(orientation, dtype=np.float64).ravel()
    if o.size != 6:
        raise ValueError(f"image orientation needs 6 values, got {o.size}")
    n = np.cross(o[:3], o[3:6])
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise ValueError(f"degenerate image orientation {tuple(float(v) for v in o)}")
    n = n / norm
    if n[2] < 0 or (n[2] == 0 and (n[1] < 0 or (n[1] == 0 and n[0] < 0))):
        n = -n
    return n


def axial_obliquity_deg(orientation: Sequence[float]) -> float:
    """Angle (degrees, 0 to 90) between the slice normal and the patient's head-foot axis.

    Parameters
    ----------
    orientation : Image Orientation (Patient), six direction cosines.

    Raises
    ------
    ValueError
        The orientation does not have six values or its vectors are parallel or null.
    """
    normal = slice_normal(orientation)
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = abs(float(a @ b)) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, cos)))


def check_axial_geometry(
    series_uid: str,
    orientation: Sequence[float],
    positions: np.ndarray,
    gantry_tilt_deg: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Check that the slices are an axial, unsheared stack; their normal and z positions.

    Parameters
    ----------
    series_uid : Series Instance UID (for the error).
    orientation : the series' Image Orientation (Patient), six direction cosines.
    positions : (n, 3) float64 Image Position (Patient) of each slice, mm (LPS); may be
        empty (then only the orientation is checked).
    gantry_tilt_deg : the largest Gantry/Detector Tilt (0018,1120) in the series, degrees.

    Returns
    -------
    (normal, z)
        ``normal`` (3,) head-pointing unit slice normal (:func:`slice_normal`); ``z`` (n,)
        position of each slice along it in mm, in the order given (unsorted).

    Raises
    ------
    InconsistentGeometryError
        The orientation is not six direction cosines of two independent vectors.
    GantryTiltError
        The positions step along the table, not along the normal, by more than
        :data:`MAX_SHEAR_DEG`, or a non-zero Gantry/Detector Tilt comes with an oblique
        orientation.
    NonAxialError
        The normal is more than :data:`MAX_OBLIQUITY_DEG` from the head-foot axis (more
        than 45 degrees: a sagittal or coronal series).
    """
    try:
        normal = slice_normal(orientation)
    except ValueError as exc:
        raise InconsistentGeometryError(series_uid, str(exc)) from exc
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    z = positions @ normal
    obliquity = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    shear = 0.0
    order = np.argsort(z)
    if len(z) >= 2 and z[order[-1]] - z[order[0]] > DUPLICATE_TOLERANCE_MM:
        stack = positions[order[-1]] - positions[order[0]]
        shear = _angle_deg(stack, normal)
    orient_txt = "\\".join(f"{v:g}" for v in orientation)
    if shear > MAX_SHEAR_DEG or (abs(gantry_tilt_deg) > 0.1 and obliquity > MAX_SHEAR_DEG):
        tilt = shear if shear > MAX_SHEAR_DEG else abs(gantry_tilt_deg)
        raise GantryTiltError(
            series_uid,
            f"gantry tilt of {tilt:.1f} degrees: the slices step along the table, not along "
            f"their normal (Image Orientation {orient_txt}, Gantry/Detector Tilt "
            f"{gantry_tilt_deg:g}); tilted stacks are not resampled",
        )
    if obliquity > 45.0:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        raise NonAxialError(
            series_uid,
            f"{plane} slices, not an axial series (Image Orientation {orient_txt}, normal "
            f"{obliquity:.1f} degrees from the head-foot axis)",
        )
    if obliquity > MAX_OBLIQUITY_DEG:
        raise NonAxialError(
            series_uid,
            f"oblique slices {obliquity:.1f} degrees from axial (limit {MAX_OBLIQUITY_DEG:g}; "
            f"Image Orientation {orient_txt})",
        )
    return normal, z


def check_slice_gaps(series_uid: str, z: np.ndarray, max_gap_ratio: float | None) -> None:
    """Raise :class:`SliceGapError` for a step larger than ``max_gap_ratio`` x the median.

    Parameters
    ----------
    z : (n,) ascending slice positions along the normal, mm.
    max_gap_ratio : None accepts any gap; fewer than 3 slices are not checked.
    """
    if max_gap_ratio is None or len(z) < 3:
        return
    steps = np.diff(z)
    median = float(np.median(steps))
    limit = max_gap_ratio * median * (1.0 + 1e-4)
    bad = np.nonzero(steps > limit)[0]
    if bad.size:
        i = int(bad[0])
        raise SliceGapError(
            series_uid,
            f"{bad.size} gap(s) larger than {max_gap_ratio:g} x the median slice step "
            f"{median:.3g} mm; the first is {steps[i]:.3g} mm between z = {z[i]:.2f} and "
            f"{z[i + 1]:.2f} mm (slices missing?)",
        )


def check_slice_count(
    series_uid: str, n: int, min_slices: int, what: str, setting: str = "min_slices"
) -> None:
    """Raise :class:`TooFewSlicesError` when ``n`` < ``min_slices``.

    Parameters
    ----------
    n : slices (CT images) in the series.
    min_slices : the minimum (``node.min_slices`` for the node and the pipeline).
    what : how the message names the series ("series 1.2.3", a file name).
    setting : how the message names the minimum (``node.min_slices`` for the node).
    """
    if n < min_slices:
        raise TooFewSlicesError(
            series_uid, f"{n} slice(s) in {what}, fewer than {setting}={min_slices}"
        )
