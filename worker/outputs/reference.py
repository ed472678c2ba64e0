"""How a viewer names an image: Instance Number and slice position, as the PACS shows them.

The locator works with a 0-based index into the series sorted by z and a z decided between
slices; a radiologist scrolls to "image 75" at the position the viewer prints. The SR and the
Secondary Capture name the L3 image the viewer's way (issue 14, defect 5); ``result.json``
keeps the 0-based index too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class ImageLabel:
    """The reader's name of one CT image.

    Attributes
    ----------
    instance_number : Instance Number (0020,0013), or None when absent or malformed.
    z_mm : Slice Location (0020,1041) in mm when present, else the z component of Image
        Position (Patient) (0020,0032); None when neither is readable.
    """

    instance_number: int | None
    z_mm: float | None

    def text(self) -> str:
        """E.g. ``"image 75, z 316.3 mm"`` (the parts that are known)."""
        parts = []
        if self.instance_number is not None:
            parts.append(f"image {self.instance_number}")
        if self.z_mm is not None:
            parts.append(f"z {self.z_mm:.1f} mm")
        return ", ".join(parts) or "image without number"


def _finite(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def image_label(ds: Dataset) -> ImageLabel:
    """The :class:`ImageLabel` of a CT image header (pixel data not needed).

    Malformed values (a non-numeric IS or DS) count as absent, never raise.
    """
    try:
        number = ds.get("InstanceNumber")
        instance = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    z = None
    try:
        z = _finite(ds.get("SliceLocation"))
        if z is None and ds.get("ImagePositionPatient") is not None:
            z = _finite(ds.ImagePositionPatient[2])
    except (TypeError, ValueError, IndexError):
        z = None
    return ImageLabel(instance, None if z is None else round(z, 1))
