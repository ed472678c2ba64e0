"""NIfTI -> DICOM CT series with the NIfTI's geometry (``l3spot convert``).

:func:`convert_nifti` refuses what it cannot convert exactly, writes the series with
:func:`worker.volume.write.write_ct_series` and then proves the conversion: the written
series, loaded back with :func:`worker.volume.load.load_dicom_series`, must give the same HU
volume and the same affine as the NIfTI file (:func:`ras_affine`), otherwise the output is
deleted and :class:`ConversionError` says why.

The generated patient context (:func:`nifti_context`) and the UID seed are the ones
``l3spot analyze`` uses for a NIfTI input, so converting a file and analysing the file give
the same Study, Series and SOP Instance UIDs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from core import ALGORITHM_NAME
from core.digest import file_sha256
from core.errors import L3SpotError
from worker.volume.load import CTVolume, load_dicom_series, load_nifti

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "NIFTI_PATIENT_ID_PREFIX",
    "NIFTI_PATIENT_NAME",
    "NIFTI_SERIES_DESCRIPTION",
    "ConversionError",
    "ConversionReport",
    "convert_nifti",
    "nifti_context",
    "nifti_uid_seed",
    "ras_affine",
]

#: Generated patient context of NIfTI input (documented in docs/outputs.md).
NIFTI_PATIENT_NAME = "L3SPOT^NIFTI"
NIFTI_PATIENT_ID_PREFIX = "L3SPOT-"
NIFTI_SERIES_DESCRIPTION = "NIfTI import (l3spot)"

#: Largest difference (mm) between an affine entry of the NIfTI and of the written series.
#: Decimal Strings keep 16 characters (PS3.5 6.2), about 1e-10 mm at 100 mm: far below.
AFFINE_TOLERANCE_MM = 1e-3

#: NIfTI spatial units (``xyzt_units``) read as millimetres; "unknown" is what most tools
#: write and every tool reads as mm.
_MM_UNITS = ("mm", "unknown")


class ConversionError(L3SpotError):
    """A NIfTI file that cannot be written as a DICOM CT series without changing it."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_nifti` wrote.

    Attributes
    ----------
    out_dir : the series folder.
    n_files : number of DICOM files (= slices).
    series_instance_uid, study_instance_uid : UIDs of the written series.
    shape_zyx : (slices, rows, columns).
    spacing_mm : (slice step, row spacing, column spacing) in mm.
    max_affine_error_mm : largest difference between the NIfTI's and the reloaded series'
        affine entries (mm).
    rounded_voxels : voxels whose HU value was rounded (0 unless rounding was allowed).
    max_rounding_hu : largest rounding (HU).
    """

    out_dir: Path
    n_files: int
    series_instance_uid: str
    study_instance_uid: str
    shape_zyx: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    max_affine_error_mm: float
    rounded_voxels: int = 0
    max_rounding_hu: float = 0.0


def nifti_uid_seed(sha256: str) -> str:
    """The seed of the UIDs generated for a NIfTI file with this content hash."""
    return f"{ALGORITHM_NAME}-nifti-{sha256}"


def nifti_context(volume: CTVolume, sha256: str) -> CTVolume:
    """``volume`` with the generated patient context of a NIfTI file (content hash based).

    Patient ID ``L3SPOT-<first 16 hex digits of the SHA-256>``, name ``L3SPOT^NIFTI``, no
    birth date or sex: the same file always lands in the same generated patient and study.
    """
    patient = dataclasses.replace(
        volume.patient,
        patient_id=NIFTI_PATIENT_ID_PREFIX + sha256[:16],
        name=NIFTI_PATIENT_NAME,
    )
    return dataclasses.replace(volume, patient=patient, series_description=NIFTI_SERIES_DESCRIPTION)


def ras_affine(volume: CTVolume) -> np.ndarray:
    """The NIfTI affine of ``volume`` in the closest-canonical (RAS) voxel order.

    Parameters
    ----------
    volume : an evenly spaced volume; ``hu`` is (z, y, x) on the canonical grid (rows
        anterior -> posterior, columns patient right -> left, z ascending to the head).

    Returns
    -------
    numpy.ndarray
        (4, 4) affine from voxel indices (i, j, k) of the array
        ``hu.transpose(2, 1, 0)[::-1, ::-1, :]`` to RAS millimetres: the layout and affine
        ``nibabel.as_closest_canonical`` gives for the NIfTI file the volume came from
        (the inverse of :func:`worker.volume.load.load_nifti`'s reordering).

    Raises
    ------
    ValueError
        The slices are not evenly spaced (no affine describes them), within 1e-3 mm.
    """
    nz, ny, nx = volume.hu.shape
    z = np.asarray(volume.z_mm, dtype=np.float64)
    step = float(np.median(np.diff(z))) if nz > 1 else float(volume.slice_thickness_mm or 1.0)
    if nz > 1 and not np.allclose(np.diff(z), step, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise ValueError("slices are not evenly spaced: no affine describes them")
    o = np.asarray(volume.image_orientation, dtype=np.float64)
    u, v = o[:3], o[3:]  # +1 column, +1 row (LPS)
    n = np.cross(u, v)
    dy, dx = (float(s) for s in volume.pixel_spacing_mm)
    lps = np.eye(4)
    lps[:3, 0] = -dx * u  # i = nx-1-column
    lps[:3, 1] = -dy * v  # j = ny-1-row
    lps[:3, 2] = step * n
    lps[:3, 3] = np.asarray(volume.image_position_first) + (nx - 1) * dx * u + (ny - 1) * dy * v
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _refuse(path: Path, why: str) -> ConversionError:
    return ConversionError(f"cannot convert {path.name}: {why}")


def _check_header(path: Path) -> None:
    """Refuse what the header alone shows cannot be converted exactly."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise _refuse(path, f"not a readable NIfTI file ({type(exc).__name__})") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise _refuse(
            path,
            f"{len(shape)}-D image {shape}: a DICOM CT series holds one 3-D volume; split the "
            "time or channel axis first (e.g. fslsplit) and convert each volume",
        )
    if len(shape) < 3:
        raise _refuse(path, f"{len(shape)}-D image {shape}, expected a 3-D volume")
    hdr = img.header
    space_unit = hdr.get_xyzt_units()[0]
    if space_unit not in _MM_UNITS:
        raise _refuse(
            path, f"spatial unit '{space_unit}' (xyzt_units); only millimetres are converted"
        )
    sform, s_code = hdr.get_sform(coded=True)
    qform, q_code = hdr.get_qform(coded=True)
    if not s_code and not q_code:
        raise _refuse(
            path,
            "sform_code and qform_code are both 0: the file has no patient geometry (only "
            "voxel sizes); a DICOM series with invented positions would be wrong",
        )
    if s_code and q_code and not np.allclose(sform, qform, rtol=0, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.max(np.abs(sform - qform)))
        raise _refuse(
            path,
            f"sform and qform disagree (up to {diff:.3g} mm): tools differ in which they "
            "read, so the geometry is ambiguous; fix the header (e.g. fslorient) first",
        )


def convert_nifti(
    path: Path | str,
    out_dir: Path | str,
    *,
    allow_rounding: bool = False,
    check_hu: bool = True,
) -> ConversionReport:
    """Write a 3-D NIfTI CT volume as a DICOM CT Image Storage series with its geometry.

    Parameters
    ----------
    path : ``.nii`` or ``.nii.gz`` file of Hounsfield units (after ``scl_slope``/``scl_inter``).
    out_dir : the series folder to write (created; it must not hold DICOM files already).
    allow_rounding : round non-integer HU values to the nearest integer (reported) instead
        of refusing the file.
    check_hu : refuse a volume whose histogram is not that of a CT in HU
        (:func:`worker.volume.hu.check_hu_histogram`).

    Returns
    -------
    ConversionReport
        What was written, with the measured affine error of the round trip (mm).

    Raises
    ------
    ConversionError
        4-D or 2-D image, non-millimetre units, no sform/qform or disagreeing ones,
        non-integer HU (unless ``allow_rounding``), a HU range that 16-bit stored values
        cannot hold at a Rescale Slope of 1, an existing series in ``out_dir``, or a round
        trip that does not give back the volume and the affine (then nothing is left in
        ``out_dir``).
    SeriesValidationError
        From :func:`worker.volume.load.load_nifti`: too oblique or sheared an affine,
        non-finite values, not Hounsfield units.

    Notes
    -----
    Study, Series, Frame of Reference and SOP Instance UIDs are seeded by the file's
    SHA-256 (:func:`nifti_uid_seed`), as in ``l3spot analyze``: converting twice gives the
    same UIDs. Patient name ``L3SPOT^NIFTI``, Patient ID ``L3SPOT-<hash prefix>``.
    """
    import nibabel as nib

    from worker.volume.write import choose_rescale, write_ct_series

    path, out_dir = Path(path), Path(out_dir)
    _check_header(path)
    if out_dir.exists() and any(out_dir.glob("*.dcm")):
        raise _refuse(path, f"{out_dir} already holds DICOM files; choose an empty folder")
    volume = load_nifti(path, min_slices=1, max_gap_ratio=None, check_hu=check_hu)

    hu = volume.hu
    rounded = np.rint(hu)
    off = np.abs(hu - rounded)
    n_rounded = int(np.count_nonzero(off))
    max_rounding = float(off.max()) if hu.size else 0.0
    if n_rounded and not allow_rounding:
        raise _refuse(
            path,
            f"{n_rounded} of {hu.size} voxels are not integer HU (up to {max_rounding:.3g} HU "
            "from the nearest integer): CT stores integers, so they would be rounded; pass "
            "--allow-rounding to accept that",
        )
    slope, _ = choose_rescale(float(hu.min()), float(hu.max()))
    if slope != 1.0:
        raise _refuse(
            path,
            f"HU range {hu.min():.0f}..{hu.max():.0f} spans more than 65535: 16-bit stored "
            "values would need a Rescale Slope above 1 and lose precision",
        )
    volume = dataclasses.replace(volume, hu=rounded.astype(np.float32))

    sha = file_sha256(path)
    written = write_ct_series(
        nifti_context(volume, sha),
        out_dir,
        uid_seed=nifti_uid_seed(sha),
        series_description=NIFTI_SERIES_DESCRIPTION,
    )
    try:
        back = load_dicom_series(out_dir, min_slices=1, max_gap_ratio=None, check_hu=False)
        expected = np.asarray(nib.as_closest_canonical(nib.load(str(path))).affine)
        error = float(np.max(np.abs(ras_affine(back) - expected)))
        if not np.array_equal(back.hu, volume.hu):
            raise _refuse(path, "the written series does not give back the same HU values")
        if error > AFFINE_TOLERANCE_MM:
            raise _refuse(
                path,
                f"the written series' geometry differs from the NIfTI affine by {error:.3g} mm "
                "(a sheared affine: DICOM slices stack along their normal)",
            )
    except BaseException:
        for f in written.source_files:
            f.unlink(missing_ok=True)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    nz, ny, nx = back.hu.shape
    return ConversionReport(
        out_dir=out_dir,
        n_files=len(written.source_files),
        series_instance_uid=written.series_instance_uid,
        study_instance_uid=written.study_instance_uid,
        shape_zyx=(nz, ny, nx),
        spacing_mm=(
            round(back.slice_spacing_mm, 6),
            float(back.pixel_spacing_mm[0]),
            float(back.pixel_spacing_mm[1]),
        ),
        max_affine_error_mm=error,
        rounded_voxels=n_rounded,
        max_rounding_hu=max_rounding,
    )
