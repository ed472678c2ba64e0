"""Loading a CT series (DICOM folder or NIfTI file) into a validated HU volume.

This module defines the :class:`CTVolume` contract every later stage relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PatientInfo:
    """Patient attributes the measurements need (PS3.3 C.7.1.1 / C.7.2.2).

    ``name``/``patient_id``/``birth_date`` are carried only to copy the Patient module into
    derived objects; they must never be logged.
    """

    patient_id: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str | None = None  # "M", "F", "O" or None
    age: str | None = None  # DICOM AS, e.g. "063Y"
    size_m: float | None = None  # PatientSize (0010,1020), metres
    weight_kg: float | None = None  # PatientWeight (0010,1030), kg


@dataclass
class CTVolume:
    """A CT series as a HU volume with its geometry and identifiers.

    Attributes
    ----------
    hu : (z, y, x) float32 array of Hounsfield units. Slices sorted by ascending z position
        along the slice normal (index 0 = most inferior, last = most superior, as in an RAS
        NIfTI); y = image rows (anterior -> posterior for a standard axial CT), x = image
        columns (patient right -> left).
    z_mm : (z,) float64 array, position of each slice along the slice normal in mm,
        strictly ascending (ImagePositionPatient projected on the normal, not InstanceNumber).
        Slices need not be evenly spaced.
    pixel_spacing_mm : (row, col) = (dy, dx) in mm.
    sop_instance_uids : per slice, the SOP Instance UID of the source image ("" for NIfTI).
    source_files : per slice, the DICOM file the slice came from (empty for NIfTI).
    study_instance_uid, series_instance_uid, frame_of_reference_uid : source identifiers
        ("" when the input had none, e.g. NIfTI; the DICOM writer then generates them).
    image_orientation : the six direction cosines (ImageOrientationPatient).
    image_position_first : ImagePositionPatient (mm) of slice 0.
    patient : see :class:`PatientInfo`.
    warnings : corrections applied while loading (e.g. identical duplicate slice dropped).
    """

    hu: np.ndarray
    z_mm: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    sop_instance_uids: list[str] = field(default_factory=list)
    source_files: list[Path] = field(default_factory=list)
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    image_orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    image_position_first: tuple[float, float, float] = (0.0, 0.0, 0.0)
    patient: PatientInfo = field(default_factory=PatientInfo)
    modality: str = "CT"
    series_description: str = ""
    study_date: str = ""
    slice_thickness_mm: float | None = None
    manufacturer: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_spacing_mm(self) -> float:
        """Median distance between consecutive slices (mm)."""
        if len(self.z_mm) < 2:
            return float(self.slice_thickness_mm or 1.0)
        return float(np.median(np.diff(self.z_mm)))

    def nearest_slice(self, z: float) -> int:
        """Index of the real slice whose z position (mm) is nearest to ``z``."""
        return int(np.argmin(np.abs(self.z_mm - z)))
