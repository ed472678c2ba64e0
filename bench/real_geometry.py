"""The benchmarks' clinical-size series: the real abdomen CT at a scanner's usual geometry.

``abdomen_ct_totalseg/ct.nii.gz`` (3 mm isotropic, 112 slices) resampled to 1 mm slices and
0.75 mm pixels and padded with air to 512 x 512: 336 x 512 x 512, HU rounded to integers as a
DICOM series stores them. One definition for every benchmark that needs it
(``bench_outputs.py`` writes it as a DICOM series, ``bench_composition.py`` keeps it in memory,
``bench_stages.py`` runs the pipeline on the written series).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.config import data_dir
from worker.volume.load import CTVolume, load_series

#: Geometry of the benchmark series: slices (1 mm), rows = columns, pixel size (mm).
N_SLICES, SIZE, PIXEL_MM = 336, 512, 0.75


def real_geometry_volume() -> CTVolume:
    """The real case at 336 x 512 x 512 (z, y, x), 1 mm slices, 0.75 mm pixels, HU integers,
    with its geometry (orientation, position of the padded first pixel) and patient."""
    vol = load_series(data_dir() / "abdomen_ct_totalseg" / "ct.nii.gz")
    dy, dx = vol.pixel_spacing_mm
    zoom = (N_SLICES / vol.hu.shape[0], dy / PIXEL_MM, dx / PIXEL_MM)
    hu = ndimage.zoom(vol.hu, zoom, order=1, mode="nearest", grid_mode=True).astype(np.float32)
    rows, cols = min(hu.shape[1], SIZE), min(hu.shape[2], SIZE)
    out = np.full((hu.shape[0], SIZE, SIZE), -1024.0, np.float32)
    r0, c0 = (SIZE - rows) // 2, (SIZE - cols) // 2
    out[:, r0 : r0 + rows, c0 : c0 + cols] = np.rint(hu[:, :rows, :cols])
    step = vol.slice_spacing_mm * vol.hu.shape[0] / hu.shape[0]
    z = vol.z_mm[0] + step * np.arange(hu.shape[0], dtype=np.float64)
    first = vol.image_position_first
    return CTVolume(
        hu=out,
        z_mm=z,
        pixel_spacing_mm=(PIXEL_MM, PIXEL_MM),
        image_orientation=vol.image_orientation,
        image_position_first=(first[0] - c0 * PIXEL_MM, first[1] - r0 * PIXEL_MM, float(z[0])),
        patient=vol.patient,
        slice_thickness_mm=step,
    )
