"""The in-plane orientation of an axial series: from the stored pixel grid to one canonical grid.

Scanners store an axial slice in whatever in-plane orientation the patient position and the
reconstruction ask for (PS3.3 C.7.6.2.1.1, Image Orientation (Patient)). Head-first supine
(HFS) is stored with row cosine (1, 0, 0) and column cosine (0, 1, 0): columns run to the
patient's left, rows to the posterior, the picture a radiologist expects. Head-first prone
(HFP; every CT colonography) is stored ``-1\\0\\0\\0\\-1\\0``: the same anatomy rotated by
180 degrees. Feet-first supine (FFS) is ``-1\\0\\0\\0\\1\\0``: mirrored left-right. Decubitus
positions swap the two axes.

Everything that looks at the anatomy (the MIP, the locator, the body composition rules, the
pictures) assumes the HFS picture, so the loader brings every series to that **canonical
grid** (``hu[z, y, x]``: y = rows anterior -> posterior, x = columns patient right -> left)
and keeps the :class:`InPlane` transform that did it. The DICOM outputs that refer to source
pixels (the SEG's frames, the SR's SCOORDs) are mapped back with :meth:`InPlane.to_source`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import NonAxialError

__all__ = ["IDENTITY", "InPlane", "in_plane_from_orientation", "patient_position_name"]


@dataclass(frozen=True)
class InPlane:
    """How a stored slice (``source[..., row, col]``) becomes the canonical slice.

    ``canonical = flip(transpose(source))``: first the two axes are swapped when
    ``transpose``, then the result's rows are reversed when ``flip_rows`` and its columns
    when ``flip_cols``. Both directions are views (no copy).

    Attributes
    ----------
    transpose : the stored rows run along the patient's left-right axis (decubitus).
    flip_rows : the canonical rows would run posterior -> anterior without the flip.
    flip_cols : the canonical columns would run left -> right without the flip.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def is_identity(self) -> bool:
        """True when the stored grid already is the canonical grid (HFS storage)."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def to_canonical(self, source: np.ndarray) -> np.ndarray:
        """View of ``source`` (..., rows, cols) on the canonical grid (..., y, x)."""
        a = np.swapaxes(source, -1, -2) if self.transpose else source
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.flip_cols:
            a = a[..., :, ::-1]
        return a

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """View of ``canonical`` (..., y, x) on the stored pixel grid (..., rows, cols)."""
        a = canonical
        if self.flip_cols:
            a = a[..., :, ::-1]
        if self.flip_rows:
            a = a[..., ::-1, :]
        return np.swapaxes(a, -1, -2) if self.transpose else a

    def spacing_to_canonical(self, spacing_mm: tuple[float, float]) -> tuple[float, float]:
        """(row, col) spacing in mm of the canonical grid from that of the stored grid."""
        dr, dc = float(spacing_mm[0]), float(spacing_mm[1])
        return (dc, dr) if self.transpose else (dr, dc)

    def canonical_geometry(
        self,
        orientation: Sequence[float],
        position_first: Sequence[float],
        spacing_mm: tuple[float, float],
        shape: tuple[int, int],
    ) -> tuple[tuple[float, ...], tuple[float, float, float]]:
        """Image Orientation and Position (Patient) of the canonical grid's slice 0.

        Parameters
        ----------
        orientation : the stored ImageOrientationPatient (row cosine, column cosine).
        position_first : ImagePositionPatient (mm, LPS) of the stored slice 0's first pixel.
        spacing_mm : stored PixelSpacing (row spacing, column spacing) in mm.
        shape : stored (rows, cols).

        Returns
        -------
        (orientation, position) of the canonical grid, so that writing the canonical volume
        with them describes the same voxels in patient space (PS3.3 C.7.6.2.1.1).
        """
        row_cos = np.asarray(orientation[:3], dtype=np.float64)  # +1 stored column
        col_cos = np.asarray(orientation[3:6], dtype=np.float64)  # +1 stored row
        dr, dc = float(spacing_mm[0]), float(spacing_mm[1])
        rows, cols = shape
        # canonical axes as (direction per stored index step, stored extent) before flips
        y_dir, y_n = (row_cos, cols) if self.transpose else (col_cos, rows)
        x_dir, x_n = (col_cos, rows) if self.transpose else (row_cos, cols)
        y_step = dc if self.transpose else dr
        x_step = dr if self.transpose else dc
        p0 = np.asarray(position_first, dtype=np.float64)
        if self.flip_rows:
            p0 = p0 + (y_n - 1) * y_step * y_dir
            y_dir = -y_dir
        if self.flip_cols:
            p0 = p0 + (x_n - 1) * x_step * x_dir
            x_dir = -x_dir
        canon = tuple(float(v) + 0.0 for v in (*x_dir, *y_dir))
        return canon, (float(p0[0]), float(p0[1]), float(p0[2]))


IDENTITY = InPlane()


def in_plane_from_orientation(orientation: Sequence[float], series_uid: str = "") -> InPlane:
    """The :class:`InPlane` transform that brings a stored axial slice to the canonical grid.

    Each stored axis is matched to the patient axis (LPS x = left, y = posterior) it runs
    along most; the canonical columns must run to +x (patient left) and the canonical rows
    to +y (posterior).

    Parameters
    ----------
    orientation : ImageOrientationPatient, six direction cosines (row, then column cosine).
    series_uid : for the error message.

    Raises
    ------
    NonAxialError
        An in-plane axis runs mainly along the head-feet axis (not an axial slice), or both
        in-plane axes run mainly along the same patient axis.
    """
    row_cos = np.asarray(orientation[:3], dtype=np.float64)
    col_cos = np.asarray(orientation[3:6], dtype=np.float64)
    row_axis = int(np.argmax(np.abs(row_cos)))
    col_axis = int(np.argmax(np.abs(col_cos)))
    if 2 in (row_axis, col_axis) or row_axis == col_axis:
        raise NonAxialError(
            series_uid,
            f"Image Orientation (Patient) {tuple(round(float(v), 4) for v in orientation)} "
            "does not lie in the axial plane",
        )
    transpose = row_axis == 1  # stored columns run anterior-posterior: a decubitus storage
    x_cos, y_cos = (col_cos, row_cos) if transpose else (row_cos, col_cos)
    return InPlane(transpose=transpose, flip_rows=bool(y_cos[1] < 0), flip_cols=bool(x_cos[0] < 0))


def patient_position_name(in_plane: InPlane) -> str:
    """A short, human name of a stored in-plane orientation, for logs and ``result.json``.

    The name describes the storage, not the patient: "HFS storage" means the stored grid is
    the canonical grid (how head-first supine series are stored).
    """
    names = {
        (False, False, False): "HFS storage",
        (False, True, True): "rotated 180 degrees (HFP storage)",
        (False, False, True): "mirrored left-right (FFS storage)",
        (False, True, False): "mirrored anterior-posterior (FFP storage)",
    }
    key = (in_plane.transpose, in_plane.flip_rows, in_plane.flip_cols)
    return names.get(key, "axes swapped (decubitus storage)")
