"""Writing a :class:`~worker.volume.load.CTVolume` as a single-frame CT Image Storage series.

Used by the phantom generator, by ``l3spot analyze`` for NIfTI inputs (which have no DICOM
context) and by the integration tests that send a real case as a DICOM series.

The objects follow the CT Image IOD (PS3.3 A.3): Patient, General Study, Patient Study,
General Series, Frame of Reference, General Equipment, General Image, Image Plane, Image
Pixel, CT Image and SOP Common modules, with a valid File Meta Information header (PS3.10).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from core import __version__
from worker.volume.load import CTVolume, slice_normal

__all__ = ["choose_rescale", "deterministic_uid", "slice_normal", "write_ct_series"]

#: Stored-value offset used whenever the HU range allows it (the usual CT convention).
DEFAULT_RESCALE_INTERCEPT = -1024.0

_INT16_MIN, _INT16_MAX = -32768, 32767


def _ds(value: float) -> str:
    """A number as a valid Decimal String (at most 16 characters)."""
    v = float(value)
    if v == 0.0:
        return "0"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return format_number_as_ds(v)


def _ds_multi(values: Sequence[float]) -> list[str]:
    return [_ds(v) for v in values]


def choose_rescale(hu_min: float, hu_max: float) -> tuple[float, float]:
    """(slope, intercept) so that ``[hu_min, hu_max]`` fits signed 16-bit stored values.

    Intercept -1024 and slope 1 (the usual CT encoding) whenever the range fits; otherwise the
    intercept centres the range and, if the range exceeds 65535 HU, the slope grows.
    """
    if not (np.isfinite(hu_min) and np.isfinite(hu_max)):
        raise ValueError("HU volume contains non-finite values")
    lo = hu_min - DEFAULT_RESCALE_INTERCEPT
    hi = hu_max - DEFAULT_RESCALE_INTERCEPT
    if lo >= _INT16_MIN and hi <= _INT16_MAX:
        return 1.0, DEFAULT_RESCALE_INTERCEPT
    span = hu_max - hu_min
    slope = 1.0 if span <= _INT16_MAX - _INT16_MIN else float(np.ceil(span / 65535.0))
    intercept = float(np.floor(hu_min - _INT16_MIN * slope))
    return slope, intercept


#: Namespace of the name-based (version 5) UUIDs behind every deterministic UID of l3spot
#: (generated series, derived SEG/SR/SC). Never change it: re-runs would stop replacing
#: earlier results in the PACS.
_UID_NAMESPACE = uuid.UUID("6f1b8f0e-3c51-5a43-9a38-4c0b4c2f7a13")


def deterministic_uid(*parts: str) -> str:
    """A UID in the 2.25 root (PS3.5 B.2) from a name-based UUID of ``parts``.

    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy sources
    (pydicom 3.0 returns a random UUID whenever ``prefix`` is None), hence this function.
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _uid(seed: str | None, *parts: str) -> str:
    if seed is None:
        return str(generate_uid(prefix=None))
    return deterministic_uid(seed, *parts)


def _el(tag: int, vr: str, value: object) -> DataElement:
    return DataElement(tag, vr, value)


def _common_elements(
    volume: CTVolume,
    *,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    series_description: str,
    slope: float,
    intercept: float,
    thickness: float,
    spacing_between: float | None,
    image_type: Sequence[str],
    series_number: int,
    patient_position: str,
) -> list[DataElement]:
    """Data elements identical in every instance of the series (everything but the
    per-slice SOP Instance UID, Instance Number, position, slice location and pixels)."""
    p = volume.patient
    rows, cols = volume.hu.shape[1:]
    els = [
        _el(0x00080005, "CS", "ISO_IR 192"),  # Specific Character Set: UTF-8
        _el(0x00080008, "CS", list(image_type)),
        _el(0x00080016, "UI", CTImageStorage),
        _el(0x00080020, "DA", volume.study_date or ""),
        _el(0x00080030, "TM", ""),
        _el(0x00080050, "SH", ""),  # Accession Number (type 2)
        _el(0x00080060, "CS", "CT"),
        _el(0x00080070, "LO", volume.manufacturer or ""),
        _el(0x00080090, "PN", ""),  # Referring Physician's Name (type 2)
        _el(0x00081090, "LO", "l3spot"),  # Manufacturer's Model Name
        _el(0x0008103E, "LO", series_description[:64]),
        _el(0x00100010, "PN", p.name or ""),
        _el(0x00100020, "LO", p.patient_id or ""),
        _el(0x00100030, "DA", p.birth_date or ""),
        _el(0x00100040, "CS", p.sex or ""),
    ]
    if p.age:
        els.append(_el(0x00101010, "AS", p.age))
    if p.size_m is not None:
        els.append(_el(0x00101020, "DS", _ds(p.size_m)))
    if p.weight_kg is not None:
        els.append(_el(0x00101030, "DS", _ds(p.weight_kg)))
    els += [
        _el(0x00180050, "DS", _ds(thickness)),
        _el(0x00181020, "LO", f"l3spot {__version__}"),  # Software Versions
    ]
    if spacing_between is not None:
        els.append(_el(0x00180088, "DS", _ds(spacing_between)))
    els += [
        _el(0x00180060, "DS", None),  # KVP (type 2)
        _el(0x00185100, "CS", patient_position),
        _el(0x0020000D, "UI", study_uid),
        _el(0x0020000E, "UI", series_uid),
        _el(0x00200010, "SH", ""),  # Study ID (type 2)
        _el(0x00200011, "IS", str(series_number)),
        _el(0x00200012, "IS", None),  # Acquisition Number (type 2)
        _el(0x00200060, "CS", ""),  # Laterality (2C; unpaired body part)
        _el(0x00200037, "DS", _ds_multi(volume.image_orientation)),
        _el(0x00200052, "UI", for_uid),
        _el(0x00201040, "LO", ""),  # Position Reference Indicator (type 2)
        _el(0x00280002, "US", 1),
        _el(0x00280004, "CS", "MONOCHROME2"),
        _el(0x00280010, "US", rows),
        _el(0x00280011, "US", cols),
        _el(0x00280030, "DS", _ds_multi(volume.pixel_spacing_mm)),
        _el(0x00280100, "US", 16),
        _el(0x00280101, "US", 16),
        _el(0x00280102, "US", 15),
        _el(0x00280103, "US", 1),
        _el(0x00281050, "DS", "40"),  # Window Center: soft tissue
        _el(0x00281051, "DS", "400"),
        _el(0x00281052, "DS", _ds(intercept)),
        _el(0x00281053, "DS", _ds(slope)),
        _el(0x00281054, "LO", "HU"),
    ]
    return els


def write_ct_series(
    volume: CTVolume,
    out_dir: Path,
    *,
    uid_seed: str | None = None,
    series_description: str = "",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    image_type: Sequence[str] = ("DERIVED", "PRIMARY", "AXIAL"),
    series_number: int = 1,
    patient_position: str = "HFS",
    max_workers: int | None = None,
) -> CTVolume:
    """Write ``volume`` as a single-frame CT Image Storage series, one file per slice.

    Parameters
    ----------
    volume : the CT volume; ``hu`` is (z, y, x) with ``z_mm`` strictly ascending.
    out_dir : folder to write into (created if missing). Files are named
        ``000001.dcm``, ``000002.dcm``, ... in slice order (slice index 0 = Instance Number 1
        = most inferior). Existing files with other names are left alone.
    uid_seed : Study, Series, Frame of Reference and SOP Instance UIDs that ``volume`` lacks
        are generated in the 2.25 root from this seed (deterministic: the same seed gives the
        same UIDs), or randomly when None. UIDs present in ``volume`` are kept.
    series_description : Series Description (0008,103E); default ``volume.series_description``.
    transfer_syntax : Explicit/Implicit VR Little Endian, or a compressed syntax pydicom can
        encode (e.g. RLE Lossless; JPEG 2000 Lossless with pylibjpeg-openjpeg).
    image_type : Image Type (0008,0008) values.
    series_number : Series Number (0020,0011).
    patient_position : Patient Position (0018,5100), e.g. "HFS" (head first supine).
    max_workers : threads used to encode and write files (default: up to 8).

    Returns
    -------
    CTVolume
        A new volume sharing ``volume.hu`` (not quantised) with the UIDs, ``source_files``,
        ``image_position_first``, ``slice_thickness_mm`` and ``series_description`` that were
        written.

    Notes
    -----
    - Pixels are stored as int16 with RescaleSlope 1 and RescaleIntercept -1024 whenever the
      HU range fits (see :func:`choose_rescale`), rounded to the nearest integer HU.
    - ImagePositionPatient of slice k is ``p0 + z_mm[k] * n`` where ``n`` is the slice normal
      (row cosines x column cosines, pointing to the head: :func:`worker.volume.load.slice_normal`)
      and ``p0`` is ``image_position_first`` with its component
      along ``n`` removed, so that the loader's projection of the position on the normal gives
      back exactly ``z_mm`` (and slice 0 is at ``image_position_first`` whenever that position
      was consistent with ``z_mm[0]``).
    - Slice Thickness is ``volume.slice_thickness_mm`` or else the median slice spacing;
      Spacing Between Slices is written only when the slices are evenly spaced (within 1 %).
    - Patient Size (m), Weight, Sex and Age come from ``volume.patient``.

    Raises
    ------
    ValueError
        The volume is not 3-D, ``z_mm`` does not match it or is not strictly ascending, the
        orientation is degenerate or the HU values are not finite.
    """
    hu = np.asarray(volume.hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    nz = hu.shape[0]
    z = np.asarray(volume.z_mm, dtype=np.float64)
    if z.shape != (nz,):
        raise ValueError(f"z_mm has {z.size} positions for {nz} slices")
    if nz > 1 and not np.all(np.diff(z) > 0):
        raise ValueError("z_mm must be strictly ascending")
    transfer_syntax = UID(transfer_syntax)
    normal = slice_normal(volume.image_orientation)
    p_first = np.asarray(volume.image_position_first, dtype=np.float64)
    p0 = p_first - float(p_first @ normal) * normal
    positions = p0[None, :] + z[:, None] * normal[None, :]

    slope, intercept = choose_rescale(float(hu.min()), float(hu.max()))

    study_uid = volume.study_instance_uid or _uid(uid_seed, "study")
    series_uid = volume.series_instance_uid or _uid(uid_seed, "series", str(series_number))
    for_uid = volume.frame_of_reference_uid or _uid(uid_seed, "frame-of-reference")
    sop_uids = list(volume.sop_instance_uids) if volume.sop_instance_uids else [""] * nz
    if len(sop_uids) != nz:
        raise ValueError(f"{len(sop_uids)} SOP Instance UIDs for {nz} slices")
    for k in range(nz):
        if not sop_uids[k]:
            sop_uids[k] = _uid(uid_seed, "sop", series_uid, str(k))

    if nz > 1:
        steps = np.diff(z)
        median_step = float(np.median(steps))
        even = bool(np.all(np.abs(steps - median_step) <= 0.01 * median_step))
    else:
        median_step, even = float(volume.slice_thickness_mm or 1.0), False
    thickness = float(volume.slice_thickness_mm or median_step)
    description = series_description or volume.series_description

    common = _common_elements(
        volume,
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        series_description=description,
        slope=slope,
        intercept=intercept,
        thickness=thickness,
        spacing_between=median_step if even else None,
        image_type=image_type,
        series_number=series_number,
        patient_position=patient_position,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"{k + 1:06d}.dcm" for k in range(nz)]
    little = transfer_syntax.is_little_endian
    implicit = transfer_syntax.is_implicit_VR

    def write_one(k: int) -> None:
        stored = np.rint((hu[k].astype(np.float32) - intercept) / slope)
        arr = np.clip(stored, _INT16_MIN, _INT16_MAX).astype(np.int16)
        ds = Dataset()
        for el in common:
            ds.add(el)
        ds.add(_el(0x00080018, "UI", sop_uids[k]))
        ds.add(_el(0x00200013, "IS", str(k + 1)))
        ds.add(_el(0x00200032, "DS", _ds_multi(positions[k])))
        ds.add(_el(0x00201041, "DS", _ds(z[k])))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"L3SPOT_{__version__}"[:16]
        ds.file_meta = meta
        if transfer_syntax.is_compressed:
            ds.compress(transfer_syntax, arr, generate_instance_uid=False)
        else:
            data = arr if little else arr.byteswap()
            ds.add(_el(0x7FE00010, "OW", data.tobytes()))
        ds.save_as(files[k], enforce_file_format=True, implicit_vr=implicit, little_endian=little)

    workers = max_workers or min(8, (os.cpu_count() or 2))
    # the compressing encoders (OpenJPEG, RLE) run one at a time: a full test run crashed
    # (SIGSEGV) with JPEG 2000 slices compressed on several threads at once
    if workers <= 1 or nz < 8 or transfer_syntax.is_compressed:
        for k in range(nz):
            write_one(k)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write_one, range(nz)))

    return dataclasses.replace(
        volume,
        sop_instance_uids=sop_uids,
        source_files=files,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        image_position_first=tuple(float(v) for v in positions[0]),
        slice_thickness_mm=thickness,
        series_description=description,
        modality="CT",
        warnings=list(volume.warnings),
    )
