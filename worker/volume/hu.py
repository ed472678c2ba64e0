"""Are these CT Hounsfield units? The rescale values and the volume's histogram.

A measurement node must refuse a series whose values it cannot read as HU rather than
measure it: a missing intercept on values stored as HU + 1024 made the real case's SMA
232.6 cm2 instead of 139.5 (issue 14, defect 2). Two checks, for DICOM and NIfTI alike:

1. :func:`check_rescale` (DICOM): Rescale Slope (0028,1053) and Rescale Intercept (0028,1052)
   are Type 1 in the CT Image module (PS3.3 C.8.2.1); absent, not a finite number, or a
   slope of 0 refuse the series. Nothing is defaulted.
2. :func:`check_hu_histogram`: on a subsample of the volume, the tissue (values above -500
   HU) must have its median between fat (about -100 HU) and soft tissue plus some bone
   (about +200 HU), and the gas (values below -500 HU), where there is some, must sit near air
   (-1000 HU; lung lies at -900 to -700). Values at or below :data:`PADDING_BELOW_HU`
   (Pixel Padding Value outside the reconstruction circle: -2048, -3024, -2000 HU as scanners
   write it) are outside the scan: :func:`replace_padding` sets them to air before anything
   measures, so padding changes neither the histogram nor a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.errors import NotHounsfieldError

#: Values at or below this (HU) are padding outside the scanned circle, not tissue.
PADDING_BELOW_HU = -1500.0
#: Air (HU): what padding becomes.
AIR_HU = -1024.0
#: Gas / tissue boundary (HU) of the histogram check.
GAS_BELOW_HU = -500.0
#: Median of the tissue voxels must lie in this range (HU): fat -100, muscle and organs
#: +40, with some bone and contrast (ANATOMY.md HU table).
TISSUE_MEDIAN_HU = (-150.0, 200.0)
#: Median of the gas voxels, where they are at least :data:`MIN_FRACTION` (HU): air -1000,
#: lung -900 to -700.
GAS_MEDIAN_HU = (-1100.0, -650.0)
#: A class of voxels shorter than this fraction of the scanned voxels is not judged.
MIN_FRACTION = 0.01
#: Subsampling step along each axis (1/64 of the voxels: a few ms on a 512 x 512 x 500 CT).
STEP = 4


def replace_padding(hu: np.ndarray) -> bool:
    """Set padding values (<= :data:`PADDING_BELOW_HU`) to air, in place.

    Parameters
    ----------
    hu : float array of HU (a slice or a volume), modified in place.

    Returns
    -------
    bool
        True when some padding was found (the loader then notes it in the volume's warnings).
    """
    pad = hu <= PADDING_BELOW_HU
    if not pad.any():
        return False
    hu[pad] = AIR_HU
    return True


def check_rescale(
    series_uid: str, slopes: Sequence[float | None], intercepts: Sequence[float | None]
) -> None:
    """Refuse a DICOM series whose Rescale Slope or Intercept cannot map its values to HU.

    Parameters
    ----------
    series_uid : for the error.
    slopes, intercepts : per slice, the parsed Rescale Slope (0028,1053) and Rescale
        Intercept (0028,1052); None where absent or not a finite number.

    Raises
    ------
    NotHounsfieldError
        A slope or intercept is absent or not finite, or a slope is 0 (PS3.3 C.8.2.1: both
        are Type 1 in CT images; l3spot never assumes a default).
    """
    n_bad_slope = sum(1 for s in slopes if s is None)
    n_bad_intercept = sum(1 for b in intercepts if b is None)
    n_zero = sum(1 for s in slopes if s == 0.0)
    problems = []
    if n_bad_slope:
        problems.append(f"Rescale Slope (0028,1053) absent or not a finite number in {n_bad_slope}")
    if n_bad_intercept:
        problems.append(
            f"Rescale Intercept (0028,1052) absent or not a finite number in {n_bad_intercept}"
        )
    if n_zero:
        problems.append(f"Rescale Slope of 0 in {n_zero}")
    if problems:
        raise NotHounsfieldError(
            series_uid,
            "; ".join(problems) + f" of {len(slopes)} images: the stored values cannot be "
            "read as Hounsfield units (PS3.3 C.8.2.1), so the series is not measured",
        )


def check_hu_histogram(series_uid: str, hu: np.ndarray) -> None:
    """Refuse a volume whose histogram is not that of a CT in Hounsfield units.

    Parameters
    ----------
    series_uid : for the error ("" for a NIfTI file).
    hu : (z, y, x) volume in what should be HU.

    Raises
    ------
    NotHounsfieldError
        No tissue at all, the tissue's median outside :data:`TISSUE_MEDIAN_HU` (e.g. stored
        values + 1024 read without their intercept), or the gas's median outside
        :data:`GAS_MEDIAN_HU` (e.g. a wrong slope).
    """
    sample = np.asarray(hu[::STEP, ::STEP, ::STEP], dtype=np.float32).ravel()
    if sample.size == 0:
        sample = np.asarray(hu, dtype=np.float32).ravel()
    sample = sample[np.isfinite(sample) & (sample > PADDING_BELOW_HU)]
    n = sample.size
    if n == 0:
        raise NotHounsfieldError(series_uid, "no voxel inside the scan (all padding or not finite)")
    tissue = sample[sample > GAS_BELOW_HU]
    gas = sample[sample <= GAS_BELOW_HU]
    if tissue.size < MIN_FRACTION * n:
        raise NotHounsfieldError(
            series_uid, f"only {100 * tissue.size / n:.1f} % of the voxels above -500 HU: no body"
        )
    lo, hi = TISSUE_MEDIAN_HU
    med = float(np.median(tissue))
    if not lo <= med <= hi:
        raise NotHounsfieldError(
            series_uid,
            f"median of the tissue voxels {med:.0f}, expected {lo:.0f}..{hi:.0f} HU (fat near "
            "-100, soft tissue near +40): the values are not CT Hounsfield units (stored "
            "values without their rescale?)",
        )
    if gas.size >= MIN_FRACTION * n:
        lo, hi = GAS_MEDIAN_HU
        gmed = float(np.median(gas))
        if not lo <= gmed <= hi:
            raise NotHounsfieldError(
                series_uid,
                f"median of the gas voxels {gmed:.0f}, expected {lo:.0f}..{hi:.0f} HU (air near "
                "-1000): the values are not CT Hounsfield units (a wrong Rescale Slope?)",
            )
