"""Loading a CT series (DICOM folder or NIfTI file) into a validated HU volume.

This module defines the :class:`CTVolume` contract every later stage relies on, the loaders
:func:`load_series` (DICOM folder or NIfTI file), :func:`load_dicom_series`,
:func:`load_nifti`, the header-only :func:`read_series_headers`, and the validation errors
(all subclasses of :class:`core.errors.SeriesValidationError`).

Validation of a DICOM folder, in this order (the first problem found is raised):

1. Files that are not DICOM Part 10 files (no ``DICM`` prefix: licences, NIfTI, text) and
   DICOMDIR files are skipped, each with a line in ``CTVolume.warnings``. A file that *is*
   DICOM but cannot be parsed or decoded raises :class:`UnreadableFileError`: a corrupt image
   of the series must never silently become a missing slice.
2. Empty SOP Instance / Study / Series UIDs (the SOP Class falls back to the file meta's
   Media Storage SOP Class UID): :class:`MissingIdentifierError` (unless
   ``require_uids=False``, used only for viewing, e.g. ``l3spot mip``).
3. More than one Series (or Study) Instance UID: :class:`MixedSeriesError`.
4. Modality not CT, or not single-frame grayscale CT Image Storage: :class:`NotCTError`
   (localizers, Image Type ``LOCALIZER``, are :class:`NonAxialError`).
5. Missing or differing Image Orientation, Rows/Columns, Pixel Spacing:
   :class:`InconsistentGeometryError` (several Frame of Reference UIDs in one series only warn:
   de-identified data such as LIDC-IDRI has one per image).
6. Slice normal more than ``MAX_OBLIQUITY_DEG`` from the patient's head-foot axis:
   :class:`NonAxialError`, unless the positions step along the table rather than along the
   normal (a sheared stack) or Gantry/Detector Tilt is non-zero: :class:`GantryTiltError`.
7. Several slices at one position: identical pixels keep the first file (sorted by path) and
   warn; different pixels raise :class:`DuplicatePositionError`.
8. A step between consecutive slices larger than ``max_gap_ratio`` (default 2) times the
   median step: :class:`SliceGapError`.
9. Fewer than ``min_slices`` slices: :class:`TooFewSlicesError`.

Steps 4, 6, 8 and 9 are the series rules of :mod:`core.series_rules`, which the node's
eligibility (:mod:`service.eligibility`) applies too, with the same reasons.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from core.dicom import ATTRIBUTE_VR, PIXEL_DATA, UNDEFINED_LENGTH, ElementWalker, blank_malformed
from core.errors import (
    DuplicatePositionError,
    GantryTiltError,
    InconsistentGeometryError,
    L3SpotError,
    MalformedDatasetError,
    MissingIdentifierError,
    MixedSeriesError,
    NonAxialError,
    NotCTError,
    SeriesValidationError,
    SliceGapError,
    TooFewSlicesError,
    UnreadableFileError,
    phi_safe_message,
)
from core.series_rules import (
    ANALYSED_SOP_CLASSES,
    CT_MODALITY,
    DUPLICATE_TOLERANCE_MM,
    MAX_OBLIQUITY_DEG,
    MAX_SHEAR_DEG,
    check_axial_geometry,
    check_slice_count,
    check_slice_gaps,
    is_localizer,
    slice_normal,
)
from worker.volume.hu import (
    check_finite,
    check_hu_histogram,
    check_rescale,
    mark_padding,
    padding_hu_range,
)
from worker.volume.orientation import (
    IDENTITY,
    InPlane,
    in_plane_from_orientation,
    patient_position_name,
)

__all__ = [
    "CTVolume",
    "DUPLICATE_TOLERANCE_MM",
    "MAX_OBLIQUITY_DEG",
    "MAX_SHEAR_DEG",
    "DuplicatePositionError",
    "GantryTiltError",
    "InconsistentGeometryError",
    "MissingIdentifierError",
    "MixedSeriesError",
    "NonAxialError",
    "NotCTError",
    "PatientInfo",
    "SeriesValidationError",
    "SliceGapError",
    "SliceHeader",
    "TooFewSlicesError",
    "UnreadableFileError",
    "is_nifti",
    "load_dicom_series",
    "load_nifti",
    "load_series",
    "read_series_headers",
    "slice_normal",
]


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
        strictly ascending (ImagePositionPatient projected on the normal, not InstanceNumber;
        the normal is row cosines x column cosines, its sign chosen to point to the patient's
        head, see :func:`slice_normal`). Slices need not be evenly spaced.
    pixel_spacing_mm : (row, col) = (dy, dx) in mm.
    sop_instance_uids : per slice, the SOP Instance UID of the source image ("" for NIfTI).
    source_files : per slice, the DICOM file the slice came from (empty for NIfTI).
    study_instance_uid, series_instance_uid, frame_of_reference_uid : source identifiers
        ("" when the input had none, e.g. NIfTI; the DICOM writer then generates them).
    image_orientation : the six direction cosines (ImageOrientationPatient) of the canonical
        grid ``hu`` is on (for a DICOM input stored in another in-plane orientation these
        differ from the stored ones: see ``in_plane``).
    image_position_first : ImagePositionPatient (mm) of the canonical grid's slice 0, pixel 0.
    in_plane : how the stored pixel grid became the canonical grid
        (:class:`worker.volume.orientation.InPlane`): ``hu`` is always on the canonical
        grid (rows anterior -> posterior, columns patient right -> left) whatever the patient
        position; ``in_plane.to_source`` maps a label map back to the stored pixels (SEG, SR).
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
    in_plane: InPlane = IDENTITY
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


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------

_ORIENTATION_TOLERANCE = 1e-4

NIFTI_SUFFIXES = (".nii", ".nii.gz")


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

_U16 = struct.Struct("<H")

_T = TypeVar("_T")
_R = TypeVar("_R")


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int | None) -> list[_R]:
    n = workers or min(16, 2 * (os.cpu_count() or 2))
    if n <= 1 or len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


def _list_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """Value of an ASCII-only element (UI, CS, DS, IS, DA, AS) without pydicom's conversion
    (about 5 times faster for DS); None when absent."""
    try:
        el = ds.get_item(tag)
    except KeyError:
        return None
    if el is None:
        return None
    if isinstance(el, RawDataElement):
        if el.value is None:
            return None
        return el.value.decode("latin-1").strip(" \x00")
    v = el.value
    if v is None:
        return None
    if isinstance(v, MultiValue | list | tuple):
        return "\\".join(str(x) for x in v)
    return str(v).strip(" \x00")


def _float_or(value: object, default: float | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class SliceHeader:
    """The attributes of one DICOM file that series selection, validation and pixel reading
    need (read without the pixel data)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    series_number: int | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, ...] | None
    image_orientation: tuple[float, ...] | None
    image_position: tuple[float, ...] | None
    slice_thickness: float | None
    gantry_tilt: float
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    rescale_slope: float | None  # None: absent or not a finite number (refused: check_rescale)
    rescale_intercept: float | None
    transfer_syntax_uid: str
    has_pixel_data: bool
    #: Byte offset of native little-endian 16-bit pixel data in the file, or None when the
    #: pixels must go through pydicom's decoders (compressed, big endian, other bit depths).
    pixel_offset: int | None = None
    #: Pixel Padding Value (0028,0120) and Pixel Padding Range Limit (0028,0121) as read (US
    #: or SS: a 16-bit pattern or a signed value); None when absent (worker.volume.hu).
    pixel_padding_value: int | None = None
    pixel_padding_range_limit: int | None = None

    def padding_hu_range(self) -> tuple[float, float] | None:
        """HU interval of this slice's stored padding values to mark as padding, or None
        (:func:`worker.volume.hu.padding_hu_range`)."""
        if self.rescale_slope is None or self.rescale_intercept is None:
            return None
        return padding_hu_range(
            self.pixel_padding_value,
            self.pixel_padding_range_limit,
            signed=self.pixel_representation == 1,
            bits_stored=self.bits_stored,
            slope=self.rescale_slope,
            intercept=self.rescale_intercept,
        )

    @classmethod
    def from_dataset(
        cls, path: Path, ds: Dataset, *, has_pixel_data: bool, pixel_offset: int | None = None
    ) -> SliceHeader:
        """Header of a dataset read by pydicom."""
        meta = getattr(ds, "file_meta", None)

        def us(tag: int) -> int | None:
            el = ds.get(tag)
            try:
                if el is None or el.value is None or el.value == b"":
                    return None
                if isinstance(el.value, bytes):  # "US or SS" left undecided: the bit pattern
                    return int(_U16.unpack_from(el.value)[0])
                return int(el.value)
            except (TypeError, ValueError, struct.error):
                return None

        return cls._build(
            path,
            text=lambda tag: _raw_text(ds, tag),
            us=us,
            description=str(ds.get("SeriesDescription") or ""),
            meta_sop_class=str(meta.get("MediaStorageSOPClassUID", "") or "") if meta else "",
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
            has_pixel_data=has_pixel_data,
            pixel_offset=pixel_offset,
        )

    @classmethod
    def _build(
        cls,
        path: Path,
        *,
        text: Callable[[int], str | None],
        us: Callable[[int], int | None],
        description: str,
        meta_sop_class: str,
        transfer_syntax: str,
        has_pixel_data: bool,
        pixel_offset: int | None,
    ) -> SliceHeader:
        def floats(tag: int, n: int) -> tuple[float, ...] | None:
            return _parse_floats(text(tag), n)

        def num(tag: int, default: float | None) -> float | None:
            v = _parse_floats(text(tag), None)
            return v[0] if v else default

        def integer(tag: int) -> int | None:
            v = num(tag, None)
            return int(v) if v is not None else None

        image_type = text(0x00080008) or ""
        bits_allocated = us(0x00280100) or 16
        return cls(
            path=path,
            sop_class_uid=text(0x00080016) or meta_sop_class,
            sop_instance_uid=text(0x00080018) or "",
            study_instance_uid=text(0x0020000D) or "",
            series_instance_uid=text(0x0020000E) or "",
            frame_of_reference_uid=text(0x00200052) or "",
            modality=(text(0x00080060) or "").upper(),
            image_type=tuple(v.strip().upper() for v in image_type.split("\\") if v.strip()),
            series_description=description,
            series_number=integer(0x00200011),
            instance_number=integer(0x00200013),
            rows=us(0x00280010),
            columns=us(0x00280011),
            pixel_spacing=floats(0x00280030, 2),
            image_orientation=floats(0x00200037, 6),
            image_position=floats(0x00200032, 3),
            slice_thickness=num(0x00180050, None),
            gantry_tilt=num(0x00181120, 0.0) or 0.0,
            number_of_frames=integer(0x00280008) or 1,
            samples_per_pixel=us(0x00280002) or 1,
            bits_allocated=bits_allocated,
            bits_stored=us(0x00280101) or bits_allocated,
            pixel_representation=us(0x00280103) or 0,
            rescale_slope=num(0x00281053, None),
            rescale_intercept=num(0x00281052, None),
            transfer_syntax_uid=transfer_syntax,
            has_pixel_data=has_pixel_data,
            pixel_offset=pixel_offset,
            pixel_padding_value=us(0x00280120),
            pixel_padding_range_limit=us(0x00280121),
        )


def _parse_floats(text: str | None, n: int | None) -> tuple[float, ...] | None:
    """Backslash-separated numbers; None when absent, malformed, non-finite or not ``n``."""
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    if (n is not None and len(vals) != n) or not all(math.isfinite(v) for v in vals):
        return None
    return vals


# Fast header parser for the common case (native little-endian Part 10 files) ---------------

_SIMPLE_CHARSETS = {
    "": "latin-1",
    "ISO_IR 6": "latin-1",
    "ISO_IR 100": "latin-1",
    "ISO_IR 192": "utf-8",
}


class _FallbackError(L3SpotError):
    """The fast parser met something it leaves to pydicom."""


def _fast_header(path: Path) -> _Read:
    """Header of a native little-endian Part 10 file without pydicom (about 10 x faster).

    Walks the element headers with :class:`core.dicom.ElementWalker` (the same walker the
    node's C-STORE check uses), reading only the top-level attributes of
    :data:`core.dicom.ATTRIBUTE_VR` and skipping sequences of defined length whole; the
    file is read only up to Pixel Data. Raises _FallbackError for anything else (deflate,
    big endian, compressed pixels, unusual character sets, malformed data): pydicom then
    reads the file.
    """
    try:
        return _fast_header_or_malformed(path)
    except MalformedDatasetError as exc:
        raise _FallbackError(str(exc)) from exc


def _fast_header_or_malformed(path: Path) -> _Read:
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        first = fp.read(16384)
        if len(first) < 132 or first[128:132] != b"DICM":
            raise _FallbackError("no DICM prefix")
        walker = ElementWalker(first, implicit=False, little=True, read_more=fp.read)
        pos, meta = 132, {}
        while True:  # File Meta Information: explicit VR little endian, group 0002
            walker.need(pos + 8)
            if walker.u16(pos) != 0x0002:
                break
            tag, _, length, value = walker.header(pos, size)
            if length == UNDEFINED_LENGTH:
                raise _FallbackError("undefined length in file meta")
            meta[tag] = walker.value(value, length)
            pos = value + length
        ts = meta.get(0x00020010, b"").decode("latin-1").strip(" \x00")
        if ts not in _NATIVE_LE:
            raise _FallbackError(f"transfer syntax {ts}")
        if meta.get(0x00020002, b"").strip(b" \x00") == _DICOMDIR_CLASS.encode():
            return _Read(path, skipped="DICOMDIR")
        implicit = ts == "1.2.840.10008.1.2"
        walker.implicit = implicit
        values: dict[int, bytes] = {}
        pixel_at = pixel_len = None
        for tag, vr, length, value, _ in walker.elements(pos, size, descend=False):
            if tag >= PIXEL_DATA:
                if tag == PIXEL_DATA:
                    pixel_at, pixel_len = value, length
                break
            if tag in ATTRIBUTE_VR and length != UNDEFINED_LENGTH:
                if not implicit and vr != ATTRIBUTE_VR[tag]:
                    raise _FallbackError(f"unexpected VR {vr!r} for {tag:08X}")
                values[tag] = walker.value(value, length)
            elif tag in _PADDING_TAGS and length == 2:  # "US or SS" (PS3.6): the bit pattern
                if not implicit and vr not in (b"US", b"SS"):
                    raise _FallbackError(f"unexpected VR {vr!r} for {tag:08X}")
                values[tag] = walker.value(value, length)

    charset = values.get(0x00080005, b"").decode("latin-1").strip(" \x00")
    if charset not in _SIMPLE_CHARSETS:
        raise _FallbackError(f"character set {charset}")

    def text(tag: int) -> str | None:
        v = values.get(tag)
        return None if v is None else v.decode("latin-1").strip(" \x00")

    def us(tag: int) -> int | None:
        v = values.get(tag)
        return _U16.unpack_from(v)[0] if v is not None and len(v) >= 2 else None

    desc = values.get(0x0008103E, b"").decode(_SIMPLE_CHARSETS[charset], "replace")
    offset = None
    rows, cols, bits, spp = us(0x00280010), us(0x00280011), us(0x00280100), us(0x00280002)
    if pixel_at is not None:
        need = (rows or 0) * (cols or 0) * ((bits or 16) // 8)
        if pixel_len == UNDEFINED_LENGTH or pixel_len < need or pixel_at + need > size:
            return _Read(path, broken=f"pixel data truncated or invalid ({size} bytes)")
        if (bits or 16) == 16 and (spp or 1) == 1:
            offset = pixel_at
    header = SliceHeader._build(
        path,
        text=text,
        us=us,
        description=desc.strip(" \x00"),
        meta_sop_class=meta.get(0x00020002, b"").decode("latin-1").strip(" \x00"),
        transfer_syntax=ts,
        has_pixel_data=pixel_at is not None,
        pixel_offset=offset,
    )
    return _Read(path, header=header)


#: Pixel Padding Value and Pixel Padding Range Limit: VR "US or SS", read beside
#: core.dicom.ATTRIBUTE_VR by the loader only (worker.volume.hu).
_PADDING_TAGS = frozenset({0x00280120, 0x00280121})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR LE
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # little, big endian


@dataclass
class _Read:
    path: Path
    header: SliceHeader | None = None
    dataset: Dataset | None = None
    skipped: str | None = None
    broken: str | None = None


def _read_header(path: Path) -> _Read:
    """Parse one file up to its pixel data and locate native pixel bytes."""
    try:
        return _fast_header(path)
    except _FallbackError:
        pass
    except OSError as exc:
        return _Read(path, broken=phi_safe_message(exc))
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None)
            if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
                return _Read(path, skipped="DICOMDIR")
            ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            deflated = ts == "1.2.840.10008.1.2.1.99"
            pos = fp.tell()
            head = b"" if deflated else fp.read(12)
            has_pixels = deflated or head[:4] in _PIXEL_DATA_TAGS
            offset = None
            if has_pixels and ts in _NATIVE_LE:
                if ts == "1.2.840.10008.1.2":  # implicit: tag, 4-byte length
                    length, value_at = int.from_bytes(head[4:8], "little"), pos + 8
                else:  # explicit OB/OW: tag, VR, 2 reserved, 4-byte length
                    length, value_at = int.from_bytes(head[8:12], "little"), pos + 12
                h0 = SliceHeader.from_dataset(path, ds, has_pixel_data=True)
                need = (h0.rows or 0) * (h0.columns or 0) * 2
                size = os.fstat(fp.fileno()).st_size
                if length == 0xFFFFFFFF or length < need or value_at + need > size:
                    return _Read(path, broken=f"pixel data truncated or invalid ({size} bytes)")
                if h0.bits_allocated == 16 and h0.samples_per_pixel == 1:
                    offset = value_at
    except InvalidDicomError:
        return _Read(path, skipped="not a DICOM file (no DICM prefix)")
    except Exception as exc:  # a Part 10 file that cannot be parsed
        return _Read(path, broken=phi_safe_message(exc))
    header = SliceHeader.from_dataset(path, ds, has_pixel_data=has_pixels, pixel_offset=offset)
    return _Read(path, header=header, dataset=ds)


def _scan(
    source: Path | Sequence[Path], workers: int | None
) -> tuple[list[_Read], list[str], list[_Read]]:
    """Headers of every file under ``source`` (a folder, or a list of files): (DICOM files,
    skip warnings, broken files)."""
    files = _list_files(source) if isinstance(source, Path) else sorted(Path(p) for p in source)
    reads = _parallel_map(_read_header, files, workers)
    good = [r for r in reads if r.header is not None]
    skipped = [f"skipped {r.path.name}: {r.skipped}" for r in reads if r.skipped]
    broken = [r for r in reads if r.broken]
    return good, skipped, broken


def read_series_headers(folder: Path | str, *, workers: int | None = None) -> list[SliceHeader]:
    """Header-only scan of a folder (recursive): one :class:`SliceHeader` per DICOM file.

    Non-DICOM files and DICOMDIR are ignored; a DICOM file that cannot be parsed raises
    :class:`UnreadableFileError`. Nothing is validated: use it to select or filter series
    (e.g. the node's eligibility rules) before loading them.
    """
    good, _, broken = _scan(Path(folder), workers)
    if broken:
        raise UnreadableFileError("", f"cannot parse {broken[0].path.name}: {broken[0].broken}")
    return [r.header for r in good if r.header is not None]


_tls = threading.local()


def _buffer(n: int) -> np.ndarray:
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=np.uint16)
        _tls.buf = buf
    return buf[:n]


def _decode_into(h: SliceHeader, out: np.ndarray) -> None:
    """HU of one slice into ``out`` (float32, rows x cols): reads only the pixel bytes for
    native 16-bit little-endian data, else decodes through pydicom's pixel handlers."""
    rows, cols = out.shape
    if h.pixel_offset is not None:
        buf = _buffer(rows * cols)
        with open(h.path, "rb") as fp:
            fp.seek(h.pixel_offset)
            got = fp.readinto(memoryview(buf).cast("B"))
        if got != buf.nbytes:
            raise ValueError(f"pixel data truncated ({got} of {buf.nbytes} bytes)")
        arr: np.ndarray = buf.reshape(rows, cols)
        if h.pixel_representation == 1:
            arr = arr.view(np.int16)
            if h.bits_stored < 16:  # sign-extend from High Bit
                shift = 16 - h.bits_stored
                arr = (arr << shift) >> shift
        elif h.bits_stored < 16:  # ignore bits above High Bit (old overlay planes)
            arr = arr & np.uint16((1 << h.bits_stored) - 1)
    else:
        ds = pydicom.dcmread(h.path)
        arr = ds.pixel_array
        if arr.shape != (rows, cols):
            raise ValueError(f"decoded shape {arr.shape}, expected {(rows, cols)}")
    slope, intercept = h.rescale_slope, h.rescale_intercept
    if slope is None or intercept is None:  # refused before decoding (check_rescale)
        raise ValueError("Rescale Slope/Intercept absent or not finite")
    if slope == 1.0:
        np.add(arr, np.float32(intercept), out=out, casting="unsafe")
    else:
        np.multiply(arr, np.float32(slope), out=out, casting="unsafe")
        out += np.float32(intercept)


def _patient_info(ds: Dataset, warnings: list[str]) -> PatientInfo:
    sex = str(ds.get("PatientSex") or "").upper() or None
    if sex not in ("M", "F", "O"):
        sex = None
    size = _float_or(ds.get("PatientSize"), None)
    if size is not None and size <= 0:
        size = None
    if size is not None and size > 3.0:  # centimetres written where metres are due
        # by name only: the height is patient data (the web page shows these warnings)
        warnings.append("PatientSize above 3 read as centimetres (divided by 100)")
        size = size / 100.0
    weight = _float_or(ds.get("PatientWeight"), None)
    return PatientInfo(
        patient_id=str(ds.get("PatientID") or ""),
        name=str(ds.get("PatientName") or ""),
        birth_date=str(ds.get("PatientBirthDate") or ""),
        sex=sex,
        age=str(ds.get("PatientAge") or "") or None,
        size_m=size,
        weight_kg=weight if weight and weight > 0 else None,
    )


def _counts(values: Iterable[str]) -> list[tuple[str, int]]:
    return Counter(values).most_common()


def load_dicom_series(
    folder: Path | str | Sequence[Path],
    *,
    min_slices: int = 20,
    max_gap_ratio: float | None = 2.0,
    require_uids: bool = True,
    workers: int | None = None,
    check_hu: bool = True,
) -> CTVolume:
    """Load and validate a folder of single-frame CT images (any file names, recursive).

    Parameters
    ----------
    folder : the series folder, or the list of the series' files (a series that shares its
        folder with others, found by :func:`worker.volume.discover.find_series`).
    min_slices : fewer slices raise :class:`TooFewSlicesError`.
    max_gap_ratio : a slice step larger than this times the median step raises
        :class:`SliceGapError`; None accepts any gap.
    require_uids : raise :class:`MissingIdentifierError` for empty SOP Instance / Study /
        Series UIDs (set False only to look at a series, never to produce results).
    workers : reader threads (default ``2 x cpu_count``, at most 16).
    check_hu : refuse a volume whose histogram is not that of a CT in HU
        (:func:`worker.volume.hu.check_hu_histogram`); False only for geometry tests on
        synthetic values. The rescale values are always checked.

    Returns
    -------
    CTVolume
        ``hu`` float32 (z, y, x) in the source pixel grid, slices sorted by ascending z along
        the head-pointing slice normal; ``warnings`` lists skipped files and dropped duplicates.

    Raises
    ------
    SeriesValidationError
        One of this module's subclasses; see the module docstring for the order of checks.
    FileNotFoundError
        ``folder`` is not a folder.

    Notes
    -----
    Each file is opened twice but every byte is read once: a header-only parse (in a thread
    pool) validates and sorts the series, then only the pixel bytes of the kept slices are
    read (native 16-bit little endian: straight into a reused buffer and converted to HU in
    place; other encodings through pydicom's decoders).
    """
    source = Path(folder) if isinstance(folder, str | Path) else [Path(p) for p in folder]
    if not isinstance(source, Path):
        folder = source[0].parent if source else Path()
    good, warnings, broken = _scan(source, workers)
    heads = [r.header for r in good if r.header is not None]
    series_set = {h.series_instance_uid for h in heads}
    uid = next(iter(series_set)) if len(series_set) == 1 else ""
    if broken:
        raise UnreadableFileError(
            uid,
            f"{len(broken)} DICOM file(s) cannot be read, e.g. {broken[0].path.name}: "
            f"{broken[0].broken}",
        )
    if not heads:
        raise TooFewSlicesError("", f"no DICOM images in {folder}")

    if require_uids:
        for attr, name in (
            ("sop_instance_uid", "SOP Instance UID"),
            ("study_instance_uid", "Study Instance UID"),
            ("series_instance_uid", "Series Instance UID"),
        ):
            empty = [h for h in heads if not getattr(h, attr)]
            if empty:
                raise MissingIdentifierError(
                    uid,
                    f"{len(empty)} of {len(heads)} image(s) have an empty {name} "
                    f"(e.g. {empty[0].path.name}); results could not reference them",
                )
    if len(series_set) > 1:
        counts = ", ".join(
            f"{u or '<empty>'} ({n})" for u, n in _counts(h.series_instance_uid for h in heads)
        )
        raise MixedSeriesError("", f"{len(series_set)} series in one folder: {counts}")
    studies = {h.study_instance_uid for h in heads}
    if len(studies) > 1:
        raise MixedSeriesError(uid, f"{len(studies)} Study Instance UIDs in one series")

    modalities = {h.modality for h in heads}
    if modalities != {CT_MODALITY}:
        raise NotCTError(
            uid, f"Modality {'/'.join(sorted(m or '<empty>' for m in modalities))}, not CT"
        )
    for h in heads:
        if h.sop_class_uid not in ANALYSED_SOP_CLASSES:
            raise NotCTError(
                uid,
                f"SOP Class {h.sop_class_uid or '<empty>'} in {h.path.name}: only single-frame "
                "CT Image Storage (1.2.840.10008.5.1.4.1.1.2) is supported",
            )
        if h.number_of_frames != 1 or h.samples_per_pixel != 1 or not h.has_pixel_data:
            raise NotCTError(uid, f"{h.path.name} is not a single-frame grayscale image")
        if is_localizer(h.image_type):
            raise NonAxialError(
                uid,
                f"{h.path.name} is a localizer (Image Type {'/'.join(h.image_type)}), "
                "not an axial slice",
            )

    for attr, name in (
        ("image_orientation", "Image Orientation (Patient)"),
        ("image_position", "Image Position (Patient)"),
        ("pixel_spacing", "Pixel Spacing"),
        ("rows", "Rows"),
        ("columns", "Columns"),
    ):
        missing = [h for h in heads if getattr(h, attr) is None]
        if missing:
            raise InconsistentGeometryError(
                uid,
                f"{name} missing or invalid in {len(missing)} image(s), "
                f"e.g. {missing[0].path.name}",
            )
    ref = heads[0]
    for h in heads[1:]:
        if (h.rows, h.columns) != (ref.rows, ref.columns):
            raise InconsistentGeometryError(
                uid,
                f"mixed image sizes: {ref.rows}x{ref.columns} ({ref.path.name}) and "
                f"{h.rows}x{h.columns} ({h.path.name})",
            )
        if not np.allclose(h.pixel_spacing, ref.pixel_spacing, rtol=0, atol=1e-4):  # type: ignore[arg-type]
            raise InconsistentGeometryError(
                uid,
                f"mixed Pixel Spacing: {ref.pixel_spacing} ({ref.path.name}) and "
                f"{h.pixel_spacing} ({h.path.name})",
            )
        if not np.allclose(
            h.image_orientation,  # type: ignore[arg-type]
            ref.image_orientation,  # type: ignore[arg-type]
            rtol=0,
            atol=_ORIENTATION_TOLERANCE,
        ):
            raise InconsistentGeometryError(
                uid,
                f"mixed Image Orientation: {ref.image_orientation} ({ref.path.name}) "
                f"and {h.image_orientation} ({h.path.name})",
            )
    if any(p <= 0 for p in ref.pixel_spacing):  # type: ignore[union-attr]
        raise InconsistentGeometryError(uid, f"invalid Pixel Spacing {ref.pixel_spacing}")
    fors = {h.frame_of_reference_uid for h in heads}
    if len(fors) > 1:
        # Seen in real de-identified data (LIDC-IDRI: one Frame of Reference UID per image);
        # one Series Instance UID means one acquisition, so the positions are comparable.
        warnings.append(
            f"{len(fors)} Frame of Reference UIDs in one series (de-identified?); "
            "the first one is kept"
        )

    positions = np.array([h.image_position for h in heads], dtype=np.float64)
    tilt = max((h.gantry_tilt for h in heads), key=abs)
    _normal, z = check_axial_geometry(uid, ref.image_orientation, positions, tilt)  # type: ignore[arg-type]

    rows, cols = int(ref.rows), int(ref.columns)  # type: ignore[arg-type]
    # Sort by z (ties: by path, so the kept duplicate is deterministic), then deduplicate.
    order = sorted(range(len(heads)), key=lambda i: (z[i], str(heads[i].path)))
    keep: list[int] = []
    for i in order:
        if keep and abs(z[i] - z[keep[-1]]) <= DUPLICATE_TOLERANCE_MM:
            j = keep[-1]
            if _same_pixels(heads[i], heads[j], (rows, cols)):
                warnings.append(
                    f"dropped {heads[i].path.name}: identical pixels to {heads[j].path.name} "
                    f"at z = {z[i]:.2f} mm"
                )
                continue
            n_same = int(np.sum(np.abs(z - z[i]) <= DUPLICATE_TOLERANCE_MM))
            raise DuplicatePositionError(
                uid,
                f"{n_same} slices with different pixels at z = {z[i]:.2f} mm "
                f"({heads[j].path.name}, {heads[i].path.name}); a time series or several "
                "reconstructions in one series?",
            )
        keep.append(i)
    sops = _counts(heads[i].sop_instance_uid for i in keep)
    if sops and sops[0][1] > 1 and sops[0][0]:
        raise MissingIdentifierError(
            uid, f"SOP Instance UID {sops[0][0]} is used by {sops[0][1]} different images"
        )

    zs = np.array([z[i] for i in keep], dtype=np.float64)
    check_slice_gaps(uid, zs, max_gap_ratio)
    check_slice_count(uid, len(keep), min_slices, f"series {uid or folder}")

    check_rescale(
        uid, [heads[i].rescale_slope for i in keep], [heads[i].rescale_intercept for i in keep]
    )
    # Any in-plane storage (HFS, HFP, FFS, FFP, decubitus) is decoded straight onto the
    # canonical grid: each slice is written through a view in the stored orientation.
    in_plane = in_plane_from_orientation(ref.image_orientation, uid)  # type: ignore[arg-type]
    canon_shape = (cols, rows) if in_plane.transpose else (rows, cols)
    hu = np.empty((len(keep), *canon_shape), dtype=np.float32)

    def decode(k: int) -> None:
        h = heads[keep[k]]
        try:
            view = in_plane.to_source(hu[k])
            _decode_into(h, view)
            padding = h.padding_hu_range()
            if padding is not None:  # Pixel Padding Value that would read as tissue
                mark_padding(view, padding)
        except Exception as exc:
            raise UnreadableFileError(
                uid,
                f"cannot decode the pixels of {h.path.name} (Transfer Syntax "
                f"{h.transfer_syntax_uid}): {phi_safe_message(exc)}",
            ) from exc

    _parallel_map(decode, list(range(len(keep))), workers)
    if check_hu:
        check_hu_histogram(uid, hu)

    stored_spacing = (float(ref.pixel_spacing[0]), float(ref.pixel_spacing[1]))  # type: ignore[index]
    canon_orientation, canon_position = in_plane.canonical_geometry(
        ref.image_orientation,  # type: ignore[arg-type]
        positions[keep[0]],
        stored_spacing,
        (rows, cols),
    )
    if not in_plane.is_identity:
        warnings.append(
            f"in-plane storage {patient_position_name(in_plane)}: analysed on the canonical "
            "grid, SEG and SR mapped back to the stored pixels"
        )
    first = good[keep[0]].dataset
    if first is None:  # fast-parsed: read the Patient/Study attributes of one file
        first = pydicom.dcmread(heads[keep[0]].path, stop_before_pixels=True)
    for keyword in blank_malformed(first):  # by name only: the value may be patient data
        warnings.append(f"{keyword}: malformed value ignored (left empty in the results)")
    return CTVolume(
        hu=hu,
        z_mm=zs,
        pixel_spacing_mm=in_plane.spacing_to_canonical(stored_spacing),
        sop_instance_uids=[heads[i].sop_instance_uid for i in keep],
        source_files=[heads[i].path for i in keep],
        study_instance_uid=ref.study_instance_uid,
        series_instance_uid=uid,
        frame_of_reference_uid=heads[keep[0]].frame_of_reference_uid,
        image_orientation=canon_orientation,
        image_position_first=canon_position,
        in_plane=in_plane,
        patient=_patient_info(first, warnings),
        modality="CT",
        series_description=ref.series_description,
        study_date=str(first.get("StudyDate") or ""),
        slice_thickness_mm=ref.slice_thickness,
        manufacturer=str(first.get("Manufacturer") or ""),
        warnings=warnings,
    )


def _same_pixels(a: SliceHeader, b: SliceHeader, shape: tuple[int, int]) -> bool:
    ha = np.empty(shape, np.float32)
    hb = np.empty(shape, np.float32)
    try:
        _decode_into(a, ha)
        _decode_into(b, hb)
    except Exception:
        return False
    return bool(np.array_equal(ha, hb))


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def load_nifti(
    path: Path | str,
    *,
    min_slices: int = 20,
    max_gap_ratio: float | None = 2.0,
    check_hu: bool = True,
) -> CTVolume:
    """Load a 3-D NIfTI CT volume (HU after scl_slope/scl_inter) in the DICOM axial layout.

    The voxel axes are permuted and flipped to the closest standard axial CT layout:
    ``hu[z, y, x]`` with z ascending = inferior -> superior, y (rows) anterior -> posterior,
    x (columns) patient right -> left. ``image_orientation``, ``image_position_first`` (LPS mm,
    centre of the first voxel of slice 0), ``pixel_spacing_mm`` and ``z_mm`` come from the
    affine (sform, else qform); an RAS volume keeps its slice index (NIfTI k = slice k).
    UIDs are empty; patient attributes unknown.

    Raises
    ------
    NonAxialError, GantryTiltError
        The affine is too oblique or sheared.
    TooFewSlicesError
        Fewer than ``min_slices`` slices.
    UnreadableFileError
        Not a readable 3-D NIfTI image.
    NotHounsfieldError
        ``check_hu`` and the values are not CT Hounsfield units (histogram check).
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise ValueError(f"expected a 3-D image, got shape {img.shape}")
        canon = nib.as_closest_canonical(img)  # axes -> R, A, S
        data = np.asarray(canon.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise UnreadableFileError("", f"cannot read NIfTI {path.name}: {exc}") from exc
    nx, ny, nz = data.shape
    aff = np.asarray(canon.affine, dtype=np.float64)
    # hu[s, r, c] = data[nx-1-c, ny-1-r, s]
    hu = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    col_step = -aff[:3, 0] * ras_to_lps  # +1 column: i decreases
    row_step = -aff[:3, 1] * ras_to_lps  # +1 row: j decreases
    slice_step = aff[:3, 2] * ras_to_lps
    dx, dy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    if dx <= 0 or dy <= 0 or float(np.linalg.norm(slice_step)) <= 0:
        raise UnreadableFileError("", f"{path.name}: degenerate affine")
    orientation = tuple(float(v) + 0.0 for v in (*(col_step / dx), *(row_step / dy)))
    origin = (aff @ np.array([nx - 1, ny - 1, 0, 1.0]))[:3] * ras_to_lps
    positions = origin[None, :] + np.arange(nz)[:, None] * slice_step[None, :]
    _, z = check_axial_geometry("", orientation, positions)
    if nz > 1 and not np.all(np.diff(z) > 0):
        raise InconsistentGeometryError("", f"{path.name}: slices do not ascend along z")
    check_slice_gaps("", z, max_gap_ratio)
    check_slice_count("", nz, min_slices, path.name)
    warnings: list[str] = []
    if check_hu:  # label maps and other non-CT NIfTI files are read with check_hu=False
        if np.issubdtype(img.get_data_dtype(), np.floating):  # NaN/inf only in float files
            check_finite("", hu, path.name)
        check_hu_histogram("", hu)
    return CTVolume(
        hu=hu,
        z_mm=np.asarray(z, dtype=np.float64),
        pixel_spacing_mm=(dy, dx),
        image_orientation=tuple(float(v) for v in orientation),
        image_position_first=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        slice_thickness_mm=float(np.linalg.norm(slice_step)),
        warnings=warnings,
    )


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_series(
    path: Path | str | Sequence[Path], *, min_slices: int = 20, **kwargs: object
) -> CTVolume:
    """Load a CT series: a folder of DICOM files, a list of DICOM files, or a ``.nii`` /
    ``.nii.gz`` file.

    Extra keyword arguments go to :func:`load_dicom_series` or :func:`load_nifti`.
    """
    if not isinstance(path, str | Path):
        return load_dicom_series(list(path), min_slices=min_slices, **kwargs)  # type: ignore[arg-type]
    p = Path(path)
    if p.is_dir():
        return load_dicom_series(p, min_slices=min_slices, **kwargs)  # type: ignore[arg-type]
    if p.is_file() and is_nifti(p):
        nifti_kw = {k: v for k, v in kwargs.items() if k in ("max_gap_ratio", "check_hu")}
        return load_nifti(p, min_slices=min_slices, **nifti_kw)  # type: ignore[arg-type]
    if p.is_file():
        raise FileNotFoundError(f"{p}: give the folder of the DICOM series or a NIfTI file")
    raise FileNotFoundError(f"no such folder or file: {p}")
