"""Which stored series are worth analysing: axial CT with enough slices, no localizers.

Everything is stored; only eligible series are queued. An ineligible series gets a job
record with the reason (so an operator can see why nothing came back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from core.config import NodeConfig
from service.spool import instance_files

#: CT Image Storage (PS3.4 Annex B.5). Enhanced CT (multi-frame) is stored but not analysed.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: |cos| of the angle between the slice normal and the patient z axis above which a series
#: counts as axial (about 10 degrees: gantry tilts up to that are still axial acquisitions).
AXIAL_MIN_COS = float(np.cos(np.deg2rad(10.0)))
_HEADER_TAGS = [
    "SOPClassUID",
    "Modality",
    "ImageType",
    "ImageOrientationPatient",
    "SeriesDescription",
    "StudyInstanceUID",
    "SeriesInstanceUID",
]


@dataclass(frozen=True)
class Eligibility:
    """Verdict on one series folder.

    Attributes
    ----------
    eligible : analyse it.
    reason : why not (empty when eligible).
    n_instances : files in the folder.
    n_images : CT Image Storage instances among them (the slices the pipeline will load).
    """

    eligible: bool
    reason: str
    n_instances: int
    n_images: int


def _is_axial(iop: object) -> bool:
    try:
        v = np.asarray([float(x) for x in iop], dtype=float)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    if v.shape != (6,):
        return False
    normal = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(normal))
    return norm > 0 and abs(normal[2]) / norm >= AXIAL_MIN_COS


def check_series(series_dir: Path, node: NodeConfig) -> Eligibility:
    """Decide whether a complete series folder should be analysed.

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>`` folder.
    node : ``node`` section of the configuration (``min_slices``,
        ``series_description_regex``).

    Returns
    -------
    Eligibility
        Rules, in order: modality CT, CT Image Storage SOP class, not a LOCALIZER
        (ImageType value 3, PS3.3 C.8.2.1.1.1), axial orientation (slice normal within
        about 10 degrees of the patient z axis), at least ``min_slices`` images,
        SeriesDescription matching ``series_description_regex`` when set.
    """
    files = instance_files(series_dir)
    n = len(files)
    headers = []
    for path in files:
        try:
            headers.append(
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
    images = [
        h
        for h in headers
        if str(h.get("SOPClassUID", "")) == CT_IMAGE_STORAGE
        and str(h.get("Modality", "")).upper() == "CT"
    ]
    if not images:
        modalities = sorted({str(h.get("Modality", "?")) for h in headers}) or ["unreadable"]
        return Eligibility(
            False, f"no CT Image Storage instances (modality {', '.join(modalities)})", n, 0
        )
    localizers = [
        h for h in images if "LOCALIZER" in [str(t).upper() for t in h.get("ImageType", [])]
    ]
    if len(localizers) == len(images):
        return Eligibility(False, "LOCALIZER series (scout image)", n, len(images))
    images = [h for h in images if h not in localizers]
    if not all(_is_axial(h.get("ImageOrientationPatient")) for h in images):
        return Eligibility(False, "not an axial series (ImageOrientationPatient)", n, len(images))
    if len(images) < node.min_slices:
        return Eligibility(
            False,
            f"{len(images)} slices, fewer than node.min_slices={node.min_slices}",
            n,
            len(images),
        )
    if node.series_description_regex:
        desc = str(images[0].get("SeriesDescription", ""))
        if re.search(node.series_description_regex, desc) is None:
            return Eligibility(
                False,
                "SeriesDescription does not match node.series_description_regex",
                n,
                len(images),
            )
    return Eligibility(True, "", n, len(images))
