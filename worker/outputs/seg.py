"""DICOM Segmentation (PS3.3 A.51) of the four body-composition compartments at L3.

One BINARY segment per compartment (segment number = label value of :mod:`core.labels`) on
the pixel grid of the L3 source image, so Weasis and OHIF overlay it without resampling
(Weasis#693 needs the non-empty Derivation Image Sequence that highdicom writes from the
source image).
"""

from __future__ import annotations

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.color import CIELabColor
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset

from core import ALGORITHM_NAME, __version__
from core.derived import MANUFACTURER
from core.labels import COMPARTMENT_COLOURS
from worker.outputs.codes import ALGORITHM_FAMILY, COMPARTMENT_CODES
from worker.outputs.equipment import algorithm_equipment, equipment_attributes
from worker.outputs.uids import derived_uid

#: Series Number of the SEG (distinct from the SR and SC, above usual scanner numbers).
SEG_SERIES_NUMBER = 9701


def seg_series_description(version: str = __version__) -> str:
    """Series Description of the SEG, e.g. ``"L3 body composition SEG (l3spot 0.1.0)"``."""
    return f"L3 body composition SEG ({ALGORITHM_NAME} {version})"


def algorithm_identification(method: str = "classical") -> AlgorithmIdentificationSequence:
    """Segment Algorithm Identification (PS3.3 C.8.20.2): name, family, version, method."""
    return AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=ALGORITHM_FAMILY,
        version=__version__,
        parameters={"composition_method": method},
    )


def segment_descriptions(
    source_series_uid: str, method: str = "classical"
) -> list[SegmentDescription]:
    """The four segment descriptions (SMA, IMAT, VAT, SAT), in segment-number order.

    Each carries the property category/type codes of :data:`COMPARTMENT_CODES`, a
    deterministic Tracking UID (shared with the SR measurement group of the same
    compartment) and the recommended display colour of :mod:`core.labels`.
    """
    algo = algorithm_identification(method)
    out = []
    for label, cc in COMPARTMENT_CODES.items():
        out.append(
            SegmentDescription(
                segment_number=label,
                segment_label=cc.name,
                segmented_property_category=cc.category,
                segmented_property_type=cc.type,
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_uid=compartment_tracking_uid(source_series_uid, cc.key),
                tracking_id=f"L3 {cc.name}",
                anatomic_regions=[cc.anatomic_region] if cc.anatomic_region else None,
                display_color=CIELabColor.from_rgb(*COMPARTMENT_COLOURS[label]),
            )
        )
    return out


def compartment_tracking_uid(source_series_uid: str, key: str) -> str:
    """Tracking UID of one compartment, identical in the SEG and the SR."""
    return derived_uid(source_series_uid, "tracking", key)


def build_seg(
    source: Dataset,
    labels: np.ndarray,
    *,
    method: str = "classical",
) -> Segmentation:
    """The L3 body-composition SEG on the grid of one CT image.

    Parameters
    ----------
    source : the L3 CT image (pydicom dataset, pixel data not needed); its Study, Patient
        and Frame of Reference are reused, its Series Instance UID seeds the derived UIDs.
    labels : (rows, cols) uint8 label map on the source pixel grid, values 0 (background),
        1 SMA, 2 IMAT, 3 VAT, 4 SAT (:mod:`core.labels`).
    method : composition method ("classical" or "unet"), recorded as an algorithm parameter.

    Returns
    -------
    highdicom.seg.Segmentation
        BINARY segmentation, one segment per compartment; empty compartments are kept in the
        Segment Sequence with no frames.

    Raises
    ------
    ValueError
        ``labels`` is not 2-D, does not match the source's Rows x Columns, or holds a value
        other than 0..4.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (rows, cols) array, got shape {labels.shape}")
    if labels.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(
            f"labels shape {labels.shape} differs from the source image "
            f"({source.Rows} x {source.Columns}): a SEG must share the source pixel grid"
        )
    bad = set(np.unique(labels).tolist()) - {0, *COMPARTMENT_CODES}
    if bad:
        raise ValueError(f"labels hold values {sorted(bad)} outside 0..4 (core.labels)")
    series_uid = str(source.SeriesInstanceUID)
    # (frames, rows, cols, segments) binary stack: one frame per segment, also when empty.
    stack = np.stack([labels == lab for lab in COMPARTMENT_CODES], axis=-1)[None]
    return Segmentation(
        source_images=[source],
        pixel_array=stack.astype(np.uint8),
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(series_uid, method),
        series_instance_uid=derived_uid(series_uid, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series_uid, "seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        **equipment_attributes(),
        contributing_equipment=[algorithm_equipment()],
        content_description="SMA, IMAT, VAT and SAT on the L3 slice",
        content_label="L3_BODY_COMP",
        content_creator_name=None,
        series_description=seg_series_description(),
        omit_empty_frames=False,
    )
