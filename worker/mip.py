"""Frontal maximum intensity projection resampled to square physical pixels.

Belharbi et al. 2017, section 3.1, normalise the frontal MIP by slice thickness so the
skeleton is not distorted; l3spot goes further and resamples to a fixed pixel size in mm so
that one model serves every slice thickness and field of view.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from worker.volume.load import CTVolume

#: HU range kept in the MIP (air floor, metal ceiling); values outside are clipped.
MIP_HU_RANGE = (-1024.0, 3071.0)


@dataclass
class Mip:
    """A frontal MIP on a square grid.

    Attributes
    ----------
    image : (rows, cols) float32 HU. Row 0 is the most superior row (head up); rows go
        inferior with step ``pixel_mm``. Columns follow the CT image columns (col 0 = the
        first image column, patient right for a standard axial CT), step ``pixel_mm``.
    pixel_mm : edge length of a pixel in mm (both axes).
    z_top_mm : z position (mm, along the slice normal) of the centre of row 0.
    slice_z_mm : (n_slices,) ascending z positions of the source slices, to map back.
    """

    image: np.ndarray
    pixel_mm: float
    z_top_mm: float
    slice_z_mm: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.image.shape[0])

    def row_to_z(self, row: float | np.ndarray) -> float | np.ndarray:
        """z position (mm) of a (fractional) MIP row."""
        return self.z_top_mm - np.asarray(row, dtype=np.float64) * self.pixel_mm

    def z_to_row(self, z_mm: float | np.ndarray) -> float | np.ndarray:
        """(Fractional) MIP row of a z position (mm)."""
        return (self.z_top_mm - np.asarray(z_mm, dtype=np.float64)) / self.pixel_mm

    def row_to_slice_index(self, row: float) -> int:
        """Index of the real source slice nearest to a MIP row (slices may be uneven)."""
        return int(np.argmin(np.abs(self.slice_z_mm - float(self.row_to_z(row)))))


@dataclass(frozen=True)
class FrontalProjection:
    """Maximum over the anterior-posterior axis of a CT volume, at the native spacing.

    The expensive half of a frontal MIP (one pass over the whole volume); resampling it to a
    pixel size (:meth:`resample`) is cheap, so one projection serves every pixel size an
    analysis needs (the locator's 3 mm and 1 mm stages, the overview picture).

    Attributes
    ----------
    image : (n_slices, n_cols) float32 HU, clipped to :data:`MIP_HU_RANGE`; row ``k`` is
        source slice ``k`` (``z_mm`` ascending, as ``CTVolume.hu``), columns are the CT image
        columns.
    z_mm : (n_slices,) ascending z positions (mm) of the source slices.
    column_mm : column spacing (mm), ``CTVolume.pixel_spacing_mm[1]``.
    """

    image: np.ndarray
    z_mm: np.ndarray
    column_mm: float

    def resample(self, pixel_mm: float) -> Mip:
        """The frontal MIP at square pixels of ``pixel_mm`` (see :func:`frontal_mip`).

        Raises
        ------
        ValueError
            ``pixel_mm`` is not positive.
        """
        if pixel_mm <= 0:
            raise ValueError(f"pixel_mm must be positive, got {pixel_mm}")
        proj, z, dx = self.image, self.z_mm, self.column_mm
        nz, nx = proj.shape
        dz = float(np.median(np.diff(z)))
        sigma = (max(0.0, (pixel_mm / dz - 1) / 2), max(0.0, (pixel_mm / dx - 1) / 2))
        if sigma[0] > 0 or sigma[1] > 0:  # a new array: the projection stays as it is
            proj = ndimage.gaussian_filter(proj, sigma=sigma, mode="nearest")

        z_top = float(z[-1])
        n_rows = int(np.floor((z_top - z[0]) / pixel_mm + 1e-6)) + 1
        z_rows = z_top - np.arange(n_rows) * pixel_mm
        zi = np.interp(z_rows, z, np.arange(nz, dtype=np.float64))  # fractional slice index
        n_cols = int(np.floor((nx - 1) * dx / pixel_mm + 1e-6)) + 1
        xi = np.arange(n_cols) * pixel_mm / dx
        grid = np.meshgrid(zi, xi, indexing="ij")
        image = ndimage.map_coordinates(proj, grid, order=1, mode="nearest").astype(np.float32)
        return Mip(image=image, pixel_mm=float(pixel_mm), z_top_mm=z_top, slice_z_mm=z)


def frontal_projection(volume: CTVolume) -> FrontalProjection:
    """Maximum over the anterior-posterior axis of ``volume``, clipped to :data:`MIP_HU_RANGE`.

    Parameters
    ----------
    volume : CT volume; ``volume.hu`` is (z, y, x) HU with z ascending (patient superior),
        y the anterior-posterior image rows.

    Returns
    -------
    FrontalProjection
        (z, x) image at the native slice positions and column spacing.

    Raises
    ------
    ValueError
        The volume has fewer than 2 slices.

    Notes
    -----
    Belharbi et al. 2017, section 3.1: the frontal MIP is the maximum along the
    anterior-posterior direction.
    """
    nz = volume.hu.shape[0]
    if nz < 2:
        raise ValueError("a frontal MIP needs at least 2 slices")
    proj = np.clip(volume.hu.max(axis=1), *MIP_HU_RANGE).astype(np.float32)  # (z, x)
    z = np.asarray(volume.z_mm, dtype=np.float64)
    return FrontalProjection(image=proj, z_mm=z, column_mm=float(volume.pixel_spacing_mm[1]))


def frontal_mip(volume: CTVolume, pixel_mm: float = 2.0) -> Mip:
    """Frontal MIP of a CT volume, resampled to square pixels of ``pixel_mm``.

    Parameters
    ----------
    volume : CT volume; ``volume.hu`` is (z, y, x) HU with z ascending (patient superior),
        y the anterior-posterior image rows.
    pixel_mm : output pixel size in mm (rows and columns).

    Returns
    -------
    Mip
        Image (rows, cols) with head up. Rows cover z from the top slice down to the bottom
        slice; z between unevenly spaced slices is interpolated linearly.

    Raises
    ------
    ValueError
        ``pixel_mm`` is not positive or the volume has fewer than 2 slices.

    Notes
    -----
    Max over the anterior-posterior axis (Belharbi et al. 2017, section 3.1). Before
    down-sampling, a Gaussian of sigma ``(step - 1) / 2`` source pixels per axis limits
    aliasing of thin bright structures (ribs). Equals
    ``frontal_projection(volume).resample(pixel_mm)``; an analysis that needs several pixel
    sizes uses :class:`FrontalMips` to project once.
    """
    if pixel_mm <= 0:
        raise ValueError(f"pixel_mm must be positive, got {pixel_mm}")
    return frontal_projection(volume).resample(pixel_mm)


class FrontalMips:
    """The frontal MIPs of one volume: one projection, one resampling per pixel size.

    One analysis needs the MIP at the pixel size of each locator stage (3 mm and 1 mm for the
    shipped models); the outputs' overview reuses the first stage's. :meth:`at` projects the
    volume on first use only and resamples once per pixel size.

    Parameters
    ----------
    volume : the CT volume ((z, y, x) HU, ``z_mm`` ascending).
    project : the projection function (:func:`frontal_projection`; a counting wrapper in the
        tests that prove one projection per analysis).

    Attributes
    ----------
    projections : how many times the volume was projected (0 or 1).
    seconds : time spent projecting and resampling (s).
    """

    def __init__(
        self,
        volume: CTVolume,
        project: Callable[[CTVolume], FrontalProjection] = frontal_projection,
    ) -> None:
        self.volume = volume
        self._project = project
        self._projection: FrontalProjection | None = None
        self._mips: dict[float, Mip] = {}
        self.projections = 0
        self.seconds = 0.0

    @property
    def projection(self) -> FrontalProjection:
        """The (z, x) projection, computed on first use.

        Raises
        ------
        ValueError
            The volume has fewer than 2 slices.
        """
        if self._projection is None:
            t0 = time.perf_counter()
            self._projection = self._project(self.volume)
            self.projections += 1
            self.seconds += time.perf_counter() - t0
        return self._projection

    def at(self, pixel_mm: float) -> Mip:
        """The frontal MIP at square pixels of ``pixel_mm`` (built once per pixel size).

        Raises
        ------
        ValueError
            ``pixel_mm`` is not positive or the volume has fewer than 2 slices.
        """
        if pixel_mm <= 0:
            raise ValueError(f"pixel_mm must be positive, got {pixel_mm}")
        key = round(float(pixel_mm), 9)
        if key not in self._mips:
            projection = self.projection
            t0 = time.perf_counter()
            self._mips[key] = projection.resample(pixel_mm)
            self.seconds += time.perf_counter() - t0
        return self._mips[key]

    @property
    def pixel_sizes(self) -> tuple[float, ...]:
        """Pixel sizes (mm) built so far, in the order they were asked for."""
        return tuple(m.pixel_mm for m in self._mips.values())
