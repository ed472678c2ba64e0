"""The same patient-space volume stored the way scanners store other patient positions.

Built by hand (explicit array operations and DICOM geometry, PS3.3 C.7.6.2.1.1), not with
:mod:`worker.volume.orientation`, so that the tests of the loader check it independently.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from worker.volume.load import CTVolume

#: Storages the tests use: head-first supine (the canonical grid), head-first prone (rotated
#: 180 degrees), feet-first supine (mirrored left-right), a decubitus storage (axes swapped).
STORAGES = ("HFS", "HFP", "FFS", "LEFT_DECUBITUS")


def stored_as(volume: CTVolume, storage: str) -> tuple[CTVolume, str]:
    """``volume`` (canonical grid) stored the way a scanner stores ``storage``.

    Returns the stored volume (stored pixels, stored ImageOrientation/Position, stored
    PixelSpacing) and the Patient Position (0018,5100) to write.
    """
    c = volume.hu
    o_row = np.asarray(volume.image_orientation[:3])
    o_col = np.asarray(volume.image_orientation[3:])
    dy, dx = volume.pixel_spacing_mm
    ny, nx = c.shape[1:]
    p0 = np.asarray(volume.image_position_first, dtype=np.float64)
    if storage == "HFS":
        hu, row, col, first, spacing, pp = c, o_row, o_col, p0, (dy, dx), "HFS"
    elif storage == "HFP":  # S[r, c] = C[ny-1-r, nx-1-c]
        hu = c[:, ::-1, ::-1]
        row, col = -o_row, -o_col
        first = p0 + (nx - 1) * dx * o_row + (ny - 1) * dy * o_col
        spacing, pp = (dy, dx), "HFP"
    elif storage == "FFS":  # S[r, c] = C[r, nx-1-c]
        hu = c[:, :, ::-1]
        row, col = -o_row, o_col
        first = p0 + (nx - 1) * dx * o_row
        spacing, pp = (dy, dx), "FFS"
    elif storage == "LEFT_DECUBITUS":  # S[r, c] = C[c, nx-1-r]
        hu = np.swapaxes(c[:, :, ::-1], 1, 2)
        row, col = o_col, -o_row
        first = p0 + (nx - 1) * dx * o_row
        spacing, pp = (dx, dy), "HFDL"
    else:
        raise ValueError(storage)
    stored = dataclasses.replace(
        volume,
        hu=np.ascontiguousarray(hu),
        image_orientation=tuple(float(v) for v in (*row, *col)),
        image_position_first=tuple(float(v) for v in first),
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
    )
    return stored, pp
