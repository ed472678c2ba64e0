"""The reader's review on the job page: slices around L3, masks, accept or correct (issue 17).

The node renders the slices itself from the spooled CT (pydicom, numpy, Pillow; nothing of
the worker), in the order the worker's loader indexes them (ascending z along the slice
normal, ties by file path), so a slice index chosen here is the index the worker measures
at. The masks come from the results' SEG (one frame per compartment on the L3 image's
stored pixel grid, segment number = label value of :mod:`core.labels`).

Who decided is :func:`service.web.auth.signed_in_name` (named users, a trusted proxy's user,
the automation token, or ``anonymous`` on an open loopback page).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from core.errors import L3SpotError
from core.labels import COMPARTMENT_COLOURS

#: Window presets (width, level) in HU: name -> (W, L). Soft tissue W400/L40 is the usual
#: abdominal window; bone W1800/L400; lung W1500/L-600 (common radiology defaults).
WINDOWS: dict[str, tuple[float, float]] = {
    "soft": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
}
#: Opacity of the compartment colours over the slice (0..1).
MASK_ALPHA = 0.45
#: Two slices closer than this along the normal (mm) are one position (the loader keeps the
#: first by path: ``worker/volume/load.py`` ``DUPLICATE_TOLERANCE_MM``).
DUPLICATE_TOLERANCE_MM = 0.01


class ReviewError(L3SpotError):
    """A review cannot be done as asked (no images, slice out of range, mismatch)."""

    def __init__(self, series_uid: str, reason: str) -> None:
        super().__init__(f"{series_uid}: {reason}")
        self.series_uid = series_uid
        self.reason = reason


@dataclass(frozen=True)
class SliceRef:
    """One image of the spooled series, in the loader's order."""

    path: Path
    z_mm: float
    sop_instance_uid: str


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def list_slices(series_dir: Path) -> list[SliceRef]:
    """The images of a spooled series sorted by ascending z (mm along the slice normal).

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>``.

    Returns
    -------
    list of SliceRef
        Ascending z, ties by path, one per position (the first by path), as
        ``worker.volume.load`` indexes them. Files without a position are left out.
    """
    heads: list[tuple[Path, pydicom.Dataset]] = []
    for path in sorted(p for p in Path(series_dir).glob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            _ = ds.ImagePositionPatient, ds.ImageOrientationPatient
        except Exception:  # noqa: BLE001 (not an image with a position: not a slice)
            continue
        heads.append((path, ds))
    if not heads:
        return []
    normal = _normal(heads[0][1])
    items = sorted(
        (
            float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])),
            str(path),
            path,
            str(ds.SOPInstanceUID),
        )
        for path, ds in heads
    )
    out: list[SliceRef] = []
    for z, _, path, sop in items:
        if out and abs(z - out[-1].z_mm) <= DUPLICATE_TOLERANCE_MM:
            continue
        out.append(SliceRef(path, z, sop))
    return out


def read_hu(path: Path) -> np.ndarray:
    """(rows, cols) float32 Hounsfield units of one CT image (stored pixel grid)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def seg_labels(seg_path: Path) -> np.ndarray | None:
    """The label map (rows, cols) uint8 of an l3spot SEG (segment number = label value).

    Returns None when the file is missing or unreadable.
    """
    try:
        ds = pydicom.dcmread(seg_path)
        frames = np.asarray(ds.pixel_array)
    except Exception:  # noqa: BLE001 (no overlay rather than no page)
        return None
    if frames.ndim == 2:
        frames = frames[None]
    labels = np.zeros(frames.shape[1:], np.uint8)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        labels[frames[i] > 0] = number
    return labels


def render_slice(
    hu: np.ndarray, window: tuple[float, float], labels: np.ndarray | None = None
) -> bytes:
    """PNG of one slice in a window, with the compartments coloured when ``labels`` given.

    Parameters
    ----------
    hu : (rows, cols) Hounsfield units.
    window : (width, level) in HU.
    labels : (rows, cols) label map on the same grid (:mod:`core.labels`), or None.

    Returns
    -------
    bytes
        An 8-bit PNG (grey, or RGB with the masks).
    """
    width, level = window
    lo = level - width / 2.0
    grey = np.clip((hu - lo) / max(width, 1.0) * 255.0, 0, 255).astype(np.uint8)
    if labels is not None and labels.shape == grey.shape:
        lut = np.zeros((256, 3), np.float32)  # label value -> colour
        for value, colour in COMPARTMENT_COLOURS.items():
            lut[value] = colour
        rgb = np.repeat(grey[..., None], 3, axis=2)
        m = np.isin(labels, list(COMPARTMENT_COLOURS))
        rgb[m] = ((1 - MASK_ALPHA) * rgb[m] + MASK_ALPHA * lut[labels[m]]).astype(np.uint8)
        image = Image.fromarray(rgb, "RGB")
    else:
        image = Image.fromarray(grey, "L")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SliceIndex:
    """:func:`list_slices` per series folder, cached by the folder's modification time."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[int, list[SliceRef]]] = OrderedDict()
        self._lock = threading.Lock()

    def slices(self, series_dir: Path) -> list[SliceRef]:
        """The series' slices (empty when the folder is gone: purged by retention)."""
        try:
            mtime = series_dir.stat().st_mtime_ns
        except OSError:
            return []
        with self._lock:
            hit = self._items.get(series_dir)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        found = list_slices(series_dir)
        with self._lock:
            self._items[series_dir] = (mtime, found)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return found


def check_l3_index(
    series_uid: str, slices: list[SliceRef], l3_index: int | None, l3_sop: str | None
) -> None:
    """Refuse to review when this page's slice order is not the worker's.

    Raises
    ------
    ReviewError
        The result's L3 slice index is outside the spooled series, or names another image
        than the result's L3 SOP Instance UID.
    """
    if l3_index is None:
        return
    if not 0 <= l3_index < len(slices):
        raise ReviewError(series_uid, f"L3 slice {l3_index} is not in the spooled series")
    if l3_sop and slices[l3_index].sop_instance_uid != l3_sop:
        raise ReviewError(
            series_uid, "the spooled series' slice order differs from the analysed one"
        )
