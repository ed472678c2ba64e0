"""Are these CT Hounsfield units? The rescale values, the padding and the volume's histogram.

A measurement node must refuse a series whose values it cannot read as HU rather than
measure it: a missing intercept on values stored as HU + 1024 made the real case's SMA
232.6 cm2 instead of 139.5 (issue 14, defect 2). Three steps, for DICOM and NIfTI alike:

1. :func:`check_rescale` (DICOM): Rescale Slope (0028,1053) and Rescale Intercept (0028,1052)
   are Type 1 in the CT Image module (PS3.3 C.8.2.1); absent, not a finite number, or a
   slope of 0 refuse the series. Nothing is defaulted, not even for signed values that look
   like HU: the histogram below is a safety net, not a licence to guess.
2. Padding: pixels outside the reconstruction circle are not tissue. Values at or below
   :data:`PADDING_BELOW_HU` (-2048, -3024, -2000 HU as scanners write them) are padding by
   value and stay as they are: the composition reads them as "outside the scan" (a trunk that
   touches them is ``body_truncated`` and its rays get no skin, ``composition.classical.
   padding_hu``), the MIP clips them to air, the histogram leaves them out. Pixel Padding
   Value (0028,0120) and Pixel Padding Range Limit (0028,0121) (PS3.3 C.7.5.1.1.2) name the
   stored padding values; where they would read as tissue or bone (GE: 63536 stored unsigned
   with intercept -1024 is 62512 "HU") :func:`mark_padding` sets them to :data:`PADDING_HU`.
   A Pixel Padding Value that reads as air (e.g. stored 0 with intercept -1024) is left
   alone: scanners clip air to the same value inside the scan, and air is what the analysis
   makes of the outside anyway.
3. :func:`check_hu_histogram`: on a subsample of the voxels inside the scan, the landmarks of
   a CT in HU (:func:`hu_landmarks`): a body (tissue above -500 HU), its median between fat
   (-100) and soft tissue with some bone (+200), fat (-190..-30 HU) in it, little above
   +700 HU (cortical bone, metal), gas (where there is some) near air (-1000) and almost
   nothing between the padding and air. HU + 1024 (an intercept lost) puts air at 0, fat at
   +924 and soft tissue at +1064: no fat, most tissue "bone", refused however much air the
   scan holds. A wrong slope puts lung and air below -1150 HU. The check is coarse by design:
   a slope off by up to about 20 % passes (0.8 does, 1.3 does not); the rescale check is the
   first guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import NotHounsfieldError

#: Values at or below this (HU) are padding outside the scanned circle, not tissue
#: (same convention as ``composition.classical.padding_hu``).
PADDING_BELOW_HU = -1500.0
#: What Pixel Padding Value pixels that would read as tissue become (HU): the usual padding.
PADDING_HU = -3024.0
#: A Pixel Padding Value whose HU is at most this reads as air and is left alone.
AIR_LIKE_MAX_HU = -900.0
#: Gas / tissue boundary (HU) of the histogram check (the body mask's threshold too).
GAS_BELOW_HU = -500.0
#: Median of the tissue voxels must lie in this range (HU): fat -100, muscle and organs
#: +40, with some bone and contrast (ANATOMY.md HU table).
TISSUE_MEDIAN_HU = (-150.0, 200.0)
#: Adipose tissue (HU), Mitsiopoulos et al. 1998 (the composition's fat range).
FAT_HU = (-190.0, -30.0)
#: At least this fraction of the tissue voxels is fat (measured: 25-46 % on the real cases,
#: 42-54 % on the phantoms; 0 % for HU + 1024; 0.5-3.2 % for HU + 200).
MIN_FAT_FRACTION = 0.05
#: Cortical bone, dense contrast and metal (HU).
DENSE_ABOVE_HU = 700.0
#: At most this fraction of the tissue voxels is that dense (measured: at most 2.4 % on the
#: real cases; 28-60 % for HU + 1024).
MAX_DENSE_FRACTION = 0.20
#: Median of the gas voxels, where they are at least :data:`MIN_FRACTION` (HU): air -1000,
#: lung -900 to -700.
GAS_MEDIAN_HU = (-1100.0, -650.0)
#: Nothing in a patient is less dense than air: values between the padding and this (HU)...
BELOW_AIR_HU = -1150.0
#: ...are at most this fraction of the voxels inside the scan (0.0 % on every real case and
#: phantom; 29-55 % for a slope of 1.5, 21-37 % for HU - 100).
MAX_BELOW_AIR_FRACTION = 0.02
#: A class of voxels smaller than this fraction of the scanned voxels is not judged.
MIN_FRACTION = 0.01
#: Largest subsampling step along each axis (1/64 of the voxels: ~10 ms on 336 x 512 x 512)...
STEP = 4
#: ...taken only while the subsample keeps at least this many voxels (small volumes: all).
MIN_SAMPLE = 250_000
#: Histogram bin width (HU) and range: bin k > 0 holds values in
#: (PADDING_BELOW_HU + (k-1) * BIN_HU, PADDING_BELOW_HU + k * BIN_HU], bin 0 the padding,
#: the last bin everything above :data:`_TOP_HU`.
BIN_HU = 5.0
_TOP_HU = 3100.0
_NBINS = int((_TOP_HU - PADDING_BELOW_HU) / BIN_HU) + 2
_NOT_HU = "values are not CT Hounsfield units: "


# --------------------------------------------------------------------------------------------
# Rescale
# --------------------------------------------------------------------------------------------


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


def rescale_value(stored: int, slope: float, intercept: float) -> float:
    """HU of one stored value, with the loader's float32 arithmetic (bit-identical)."""
    if slope == 1.0:
        return float(np.float32(stored) + np.float32(intercept))
    return float(np.float32(stored) * np.float32(slope) + np.float32(intercept))


def check_finite(series_uid: str, hu: np.ndarray, name: str = "") -> None:
    """Refuse a volume with a value that is not a finite number (NaN, inf).

    DICOM integer pixels cannot hold one; a floating-point NIfTI can (some pipelines write
    NaN outside a mask), and one NaN makes every maximum of the MIP through it NaN.

    Raises
    ------
    NotHounsfieldError
        Some voxel is NaN or infinite.
    """
    bad = int(hu.size - np.count_nonzero(np.isfinite(hu)))
    if bad:
        where = f"{name}: " if name else ""
        raise NotHounsfieldError(
            series_uid, f"{_NOT_HU}{where}{bad} of {hu.size} voxels are not finite (NaN, inf)"
        )


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


def _as_stored(pattern: int, signed: bool, bits_stored: int) -> int:
    """A 16-bit attribute value as the loader reads the pixels: bits above High Bit dropped,
    sign-extended from High Bit when Pixel Representation is 1. Handles Pixel Padding Value
    written SS on unsigned pixels (GE: -2000 for the stored 63536) and the reverse."""
    bits = min(max(int(bits_stored), 1), 16)
    v = int(pattern) & ((1 << bits) - 1)
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


def padding_hu_range(
    value: int | None,
    range_limit: int | None,
    *,
    signed: bool,
    bits_stored: int,
    slope: float,
    intercept: float,
) -> tuple[float, float] | None:
    """HU interval of the stored padding values that :func:`mark_padding` must mark.

    Parameters
    ----------
    value : Pixel Padding Value (0028,0120) as read (an unsigned 16-bit pattern or a signed
        value), None when absent.
    range_limit : Pixel Padding Range Limit (0028,0121), None when absent.
    signed : Pixel Representation is 1.
    bits_stored : Bits Stored (0028,0101).
    slope, intercept : the slice's Rescale Slope and Intercept.

    Returns
    -------
    (low, high) in HU, both inclusive, or None when there is no Pixel Padding Value, when it
    reads as padding already (at most :data:`PADDING_BELOW_HU`) or as air (at most
    :data:`AIR_LIKE_MAX_HU`: scanners clip air to the same value inside the scan).
    """
    if value is None:
        return None
    stored = [_as_stored(v, signed, bits_stored) for v in (value, range_limit) if v is not None]
    hus = [rescale_value(v, slope, intercept) for v in stored]
    lo, hi = min(hus), max(hus)
    if hi <= AIR_LIKE_MAX_HU:
        return None
    return lo, hi


def mark_padding(hu: np.ndarray, hu_range: tuple[float, float]) -> int:
    """Set the padding pixels of one slice to :data:`PADDING_HU`, in place.

    Padding is what lies outside the reconstruction circle: the pixels in ``hu_range`` that
    are joined to an image edge along their row or column by other such pixels. A pixel of
    that value inside the scan (the same number as some tissue) is left alone.

    Parameters
    ----------
    hu : (rows, cols) float32 HU of one slice (any in-plane orientation; a view is fine).
    hu_range : (low, high) HU of the stored padding values (:func:`padding_hu_range`).

    Returns
    -------
    int
        Pixels set to :data:`PADDING_HU`.
    """
    lo, hi = hu_range
    m = (hu >= lo) & (hu <= hi)
    if not m.any():
        return 0
    run = np.logical_and.accumulate(m, axis=1)
    run |= np.logical_and.accumulate(m[:, ::-1], axis=1)[:, ::-1]
    run |= np.logical_and.accumulate(m, axis=0)
    run |= np.logical_and.accumulate(m[::-1], axis=0)[::-1]
    hu[run] = PADDING_HU
    return int(np.count_nonzero(run))


# --------------------------------------------------------------------------------------------
# Histogram
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HuLandmarks:
    """What the histogram of a volume says about its units (fractions in 0..1).

    ``scanned`` voxels of the subsample lie inside the scan (above
    :data:`PADDING_BELOW_HU`); ``tissue`` are those above :data:`GAS_BELOW_HU` and ``gas``
    the others. Medians are to :data:`BIN_HU` (None for an empty class).
    """

    sampled: int
    not_finite: int
    scanned: int
    tissue_fraction: float  # of scanned
    tissue_median_hu: float | None
    fat_fraction: float  # of tissue, FAT_HU
    dense_fraction: float  # of tissue, above DENSE_ABOVE_HU
    gas_fraction: float  # of scanned
    gas_median_hu: float | None
    below_air_fraction: float  # of scanned, PADDING_BELOW_HU < v < BELOW_AIR_HU


def _bin(hu: float) -> int:
    """Index of the first bin whose values are all above ``hu`` (a multiple of BIN_HU)."""
    return int(round((hu - PADDING_BELOW_HU) / BIN_HU)) + 1


def hu_landmarks(hu: np.ndarray, step: int | None = None) -> HuLandmarks:
    """Histogram landmarks of a subsample of ``hu`` (every ``step``-th voxel along each axis).

    Parameters
    ----------
    hu : (z, y, x) volume in what should be HU (padding included).
    step : subsampling step along each axis; default the largest up to :data:`STEP` that
        keeps :data:`MIN_SAMPLE` voxels.
    """
    if step is None:
        step = STEP
        while step > 1 and hu.size < MIN_SAMPLE * step**3:
            step //= 2
    sample = np.asarray(hu[::step, ::step, ::step], dtype=np.float32).ravel()
    if sample.size == 0:
        sample = np.asarray(hu, dtype=np.float32).ravel()
    finite = np.isfinite(sample)
    not_finite = int(sample.size - np.count_nonzero(finite))
    if not_finite:
        sample = sample[finite]
    # bin 0: padding (<= PADDING_BELOW_HU); bin k: (P + (k-1) B, P + k B]; last: above the top
    idx = np.ceil((sample - np.float32(PADDING_BELOW_HU)) / np.float32(BIN_HU))
    np.clip(idx, 0, _NBINS - 1, out=idx)
    counts = np.bincount(idx.astype(np.intp), minlength=_NBINS)
    cum = np.cumsum(counts)
    total = int(cum[-1])

    def count(lo_hu: float | None, hi_hu: float | None) -> int:
        """Voxels in (lo_hu, hi_hu]; None: open end (padding excluded below)."""
        a = 1 if lo_hu is None else _bin(lo_hu)
        b = _NBINS - 1 if hi_hu is None else _bin(hi_hu) - 1
        return int(cum[b] - cum[a - 1]) if b >= a else 0

    def median(lo_hu: float | None, hi_hu: float | None) -> float | None:
        a = 1 if lo_hu is None else _bin(lo_hu)
        b = _NBINS - 1 if hi_hu is None else _bin(hi_hu) - 1
        n = int(cum[b] - cum[a - 1]) if b >= a else 0
        if n == 0:
            return None
        k = int(np.searchsorted(cum, cum[a - 1] + (n + 1) // 2))
        return PADDING_BELOW_HU + (k - 0.5) * BIN_HU  # bin centre

    scanned = total - int(counts[0])
    tissue = count(GAS_BELOW_HU, None)
    gas = count(None, GAS_BELOW_HU)
    return HuLandmarks(
        sampled=int(sample.size) + not_finite,
        not_finite=not_finite,
        scanned=scanned,
        tissue_fraction=tissue / scanned if scanned else 0.0,
        tissue_median_hu=median(GAS_BELOW_HU, None),
        fat_fraction=count(FAT_HU[0] - BIN_HU, FAT_HU[1]) / tissue if tissue else 0.0,
        dense_fraction=count(DENSE_ABOVE_HU, None) / tissue if tissue else 0.0,
        gas_fraction=gas / scanned if scanned else 0.0,
        gas_median_hu=median(None, GAS_BELOW_HU),
        below_air_fraction=count(None, BELOW_AIR_HU - BIN_HU) / scanned if scanned else 0.0,
    )


def check_hu_histogram(series_uid: str, hu: np.ndarray) -> HuLandmarks:
    """Refuse a volume whose histogram is not that of a CT in Hounsfield units.

    Parameters
    ----------
    series_uid : for the error ("" for a NIfTI file).
    hu : (z, y, x) volume in what should be HU (padding included, any value at or below
        :data:`PADDING_BELOW_HU`).

    Returns
    -------
    HuLandmarks
        The landmarks that passed (for logs and tests).

    Raises
    ------
    NotHounsfieldError
        With a reason that starts "values are not CT Hounsfield units": a value that is not a
        finite number; no voxel inside the scan; no body (under 1 % above -500 HU); the
        tissue's median outside :data:`TISSUE_MEDIAN_HU`; under :data:`MIN_FAT_FRACTION` fat
        or over :data:`MAX_DENSE_FRACTION` above +700 HU in the tissue (values + 1024); the
        gas's median outside :data:`GAS_MEDIAN_HU`, or over :data:`MAX_BELOW_AIR_FRACTION`
        of the voxels below air (a wrong slope or intercept).

    Notes
    -----
    Cost: one strided copy of 1/64 of the voxels and one histogram (5 HU bins): about 10 ms
    on a 336 x 512 x 512 volume (tests/unit/test_hu_sanity.py::test_the_histogram_check_is_fast).
    """
    lm = hu_landmarks(hu)

    def refuse(why: str) -> NotHounsfieldError:
        return NotHounsfieldError(series_uid, _NOT_HU + why)

    if lm.not_finite:
        raise refuse(f"{lm.not_finite} of {lm.sampled} sampled voxels are not finite (NaN, inf)")
    if lm.scanned == 0:
        raise refuse("no voxel inside the scan (all padding)")
    if lm.tissue_fraction < MIN_FRACTION:
        raise refuse(f"only {100 * lm.tissue_fraction:.1f} % of the voxels above -500 HU: no body")
    lo, hi = TISSUE_MEDIAN_HU
    med = lm.tissue_median_hu
    if med is None or not lo <= med <= hi:
        raise refuse(
            f"median of the tissue voxels {med:.0f}, expected {lo:.0f}..{hi:.0f} HU (fat near "
            "-100, soft tissue near +40; stored values without their rescale?)"
        )
    if lm.fat_fraction < MIN_FAT_FRACTION:
        raise refuse(
            f"{100 * lm.fat_fraction:.1f} % of the tissue voxels in the fat range "
            f"{FAT_HU[0]:.0f}..{FAT_HU[1]:.0f} HU, expected at least "
            f"{100 * MIN_FAT_FRACTION:.0f} % (fat near -100 HU; stored values without their "
            "Rescale Intercept?)"
        )
    if lm.dense_fraction > MAX_DENSE_FRACTION:
        raise refuse(
            f"{100 * lm.dense_fraction:.1f} % of the tissue voxels above "
            f"+{DENSE_ABOVE_HU:.0f} HU, expected at most {100 * MAX_DENSE_FRACTION:.0f} % "
            "(only cortical bone and metal are that dense; stored values without their "
            "Rescale Intercept?)"
        )
    if lm.gas_fraction >= MIN_FRACTION:
        lo, hi = GAS_MEDIAN_HU
        gmed = lm.gas_median_hu
        if gmed is None or not lo <= gmed <= hi:
            raise refuse(
                f"median of the gas voxels {gmed:.0f}, expected {lo:.0f}..{hi:.0f} HU (air "
                "near -1000; a wrong Rescale Slope?)"
            )
    if lm.below_air_fraction > MAX_BELOW_AIR_FRACTION:
        raise refuse(
            f"{100 * lm.below_air_fraction:.1f} % of the voxels between "
            f"{PADDING_BELOW_HU:.0f} and {BELOW_AIR_HU:.0f} HU, below air (-1000 HU), expected "
            f"at most {100 * MAX_BELOW_AIR_FRACTION:.0f} % (a wrong Rescale Slope or Intercept?)"
        )
    return lm
