"""TID 1500 Measurement Report (Comprehensive 3D SR) of the L3 body composition.

Content tree (PS3.16 TID 1500, with TID 1410 / TID 1501 measurement groups):

- observer context: device observer "l3spot" (TID 1004), procedure reported;
- image library: the L3 CT image (or, when L3 is not in the field of view, the middle image
  of the series, as the image the report is about);
- one group "L3 localisation" (TID 1410 with an SCOORD POINT on the L3 image; TID 1501 when
  L3 is not in the field of view): slice position (mm), confidence, "L3 in field of view";
- one TID 1410 group per compartment (SMA, IMAT, VAT, SAT): tracking identifier and UID
  (the SEG segment's), finding = the segment's property type, finding site L3 vertebra
  (SCT 36470004), the SEG segment reference, a closed SCOORD POLYLINE (the outline) on the
  L3 image (OHIF draws only groups with an image region, OHIF#3390), Area (SCT 42798000,
  cm2), Mean Attenuation Coefficient (DCM 112181, [hnsf'U]) and its standard deviation;
  the SMA group also carries the skeletal muscle index and the sarcopenia evaluation when
  available.

The SEG reference is built as ``ReferencedSegmentationFrame`` with
``SourceImageForSegmentation(ct.SOPClassUID, ct.SOPInstanceUID)`` and no source frame number:
highdicom's ``from_segmentation`` writes SEG frame numbers as frame numbers of the single-frame
CT, which dciodvfy reports as errors (DESIGN.md, "Known pitfalls").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    SourceImageForRegion,
    SourceImageForSegmentation,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage
from skimage import measure

from core import ALGORITHM_NAME, __version__
from worker.composition.measure import CompositionResult
from worker.locator.locate import L3Location
from worker.outputs import codes as c
from worker.outputs.seg import MANUFACTURER, MANUFACTURER_MODEL_NAME, compartment_tracking_uid
from worker.outputs.uids import derived_uid, device_observer_uid

#: Series Number of the SR.
SR_SERIES_NUMBER = 9702

#: Text of the localisation group's tracking identifier when L3 is outside the scan.
NOT_IN_FOV_TEXT = "L3 not in field of view"


def sr_series_description(version: str = __version__) -> str:
    """Series Description of the SR, e.g. ``"L3 body composition report (l3spot 0.1.0)"``."""
    return f"L3 body composition report ({ALGORITHM_NAME} {version})"


def _algorithm_id() -> AlgorithmIdentification:
    return AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)


def _observation_context() -> ObservationContext:
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(),
            name=ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER_MODEL_NAME,
        ),
    )
    return ObservationContext(observer_device_context=device)


def region_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Outline of the largest connected part of ``mask`` as a closed SCOORD POLYLINE.

    PS3.3 C.18.6.1.2: a closed POLYLINE (first point = last point) is the 2-D polygon.

    Parameters
    ----------
    mask : (rows, cols) bool array on the source image grid.

    Returns
    -------
    numpy.ndarray or None
        (n, 2) float array of (column, row) image coordinates, 0.0/0.0 = top left corner of
        the top left pixel (PS3.3 C.18.6.1.1), first point equal to the last; None when the
        mask is empty.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    comp, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
        mask = comp == (int(np.argmax(sizes)) + 1)
    filled = ndimage.binary_fill_holes(mask)
    padded = np.pad(filled, 1).astype(np.float32)
    contours = measure.find_contours(padded, 0.5)
    contour = max(contours, key=len)  # (row, col) in padded coordinates, closed
    contour = measure.approximate_polygon(contour, tolerance=0.75)
    if len(contour) < 4:  # a single pixel: its four corners
        r, col = np.argwhere(filled)[0]
        square = [(col, r), (col + 1, r), (col + 1, r + 1), (col, r + 1), (col, r)]
        return np.asarray(square, dtype=np.float32)
    # padded (row, col) -> image (col, row): -1 for the padding, +0.5 for pixel centres
    pts = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1).astype(np.float32)
    pts[-1] = pts[0]
    return pts


def _centre_point(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(1, 2) (column, row) of the centroid of ``mask`` (image centre when empty)."""
    if mask.any():
        r, col = ndimage.center_of_mass(mask)
    else:
        r, col = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return np.array([[col + 0.5, r + 0.5]], dtype=np.float32)


def _localisation_group(
    ct: Dataset,
    location: L3Location,
    composition: CompositionResult | None,
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    series_uid = str(ct.SeriesInstanceUID)
    conf = Measurement(name=c.L3_CONFIDENCE, value=float(location.confidence), unit=c.UNIT_NONE)
    if not location.in_field_of_view:
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid(series_uid, "tracking", "l3"), identifier=NOT_IN_FOV_TEXT
            ),
            finding_type=c.L3_LOCALISATION,
            algorithm_id=_algorithm_id(),
            finding_sites=[FindingSite(c.L3_VERTEBRA)],
            measurements=[conf],
            qualitative_evaluations=[QualitativeEvaluation(c.L3_IN_FIELD_OF_VIEW, c.NO)],
        )
    shape = (int(ct.Rows), int(ct.Columns))
    body = composition.labels > 0 if composition is not None else np.zeros(shape, dtype=bool)
    measurements = [conf]
    if location.z_mm is not None:
        measurements.insert(
            0, Measurement(name=c.L3_SLICE_POSITION, value=float(location.z_mm), unit=c.UNIT_MM)
        )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(series_uid, "tracking", "l3"), identifier="L3 localisation"
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POINT,
            graphic_data=_centre_point(body, shape),
            source_image=SourceImageForRegion(ct.SOPClassUID, ct.SOPInstanceUID),
        ),
        finding_type=c.L3_LOCALISATION,
        algorithm_id=_algorithm_id(),
        finding_sites=[FindingSite(c.L3_VERTEBRA)],
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(c.L3_IN_FIELD_OF_VIEW, c.YES)],
    )


def _segment_frame_number(seg: Segmentation, segment_number: int) -> int:
    """1-based SEG frame that holds ``segment_number`` (one frame per segment here)."""
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment_number:
            return i
    raise ValueError(f"SEG {seg.SOPInstanceUID} has no frame for segment {segment_number}")


def _compartment_groups(
    ct: Dataset, composition: CompositionResult, seg: Segmentation
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    series_uid = str(ct.SeriesInstanceUID)
    shape = (int(ct.Rows), int(ct.Columns))
    groups = []
    for label, cc in c.COMPARTMENT_CODES.items():
        tm = composition.measures.get(cc.key)
        if tm is None:
            continue
        mask = composition.labels == label
        measurements = [Measurement(name=c.AREA, value=float(tm.area_cm2), unit=c.UNIT_CM2)]
        if tm.mean_hu is not None:
            measurements.append(
                Measurement(name=c.MEAN_ATTENUATION, value=float(tm.mean_hu), unit=c.UNIT_HU)
            )
        if tm.sd_hu is not None:
            measurements.append(
                Measurement(
                    name=codes.DCM.AttenuationCoefficient,
                    value=float(tm.sd_hu),
                    unit=c.UNIT_HU,
                    derivation=c.STANDARD_DEVIATION,
                )
            )
        evaluations = []
        if cc.key == "sma":
            if composition.smi_cm2_per_m2 is not None:
                measurements.append(
                    Measurement(
                        name=c.SKELETAL_MUSCLE_INDEX,
                        value=float(composition.smi_cm2_per_m2),
                        unit=c.UNIT_CM2_PER_M2,
                    )
                )
            sarc = composition.sarcopenia
            if sarc is not None:
                value = c.INDETERMINATE if sarc.flag is None else (c.YES if sarc.flag else c.NO)
                evaluations.append(QualitativeEvaluation(c.SARCOPENIA, value))
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=compartment_tracking_uid(series_uid, cc.key), identifier=f"L3 {cc.name}"
            ),
            referenced_segment=ReferencedSegmentationFrame(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                frame_number=_segment_frame_number(seg, label),
                segment_number=label,
                source_image=SourceImageForSegmentation(ct.SOPClassUID, ct.SOPInstanceUID),
            ),
            finding_type=cc.type,
            algorithm_id=_algorithm_id(),
            finding_sites=[FindingSite(c.L3_VERTEBRA)],
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        )
        # PS3.3 C.18.3.1.1: Referenced Segment Number shall not be present together with
        # Referenced Frame Number (dciodvfy error). The segment number alone selects the
        # segment's frames, so drop the frame number highdicom always writes.
        for it in group[0].ContentSequence:
            if it.ConceptNameCodeSequence[0].CodeValue == "121214":  # Ref. Segmentation Frame
                for ref in it.ReferencedSOPSequence:
                    if "ReferencedFrameNumber" in ref:
                        del ref.ReferencedFrameNumber
        polygon = region_polygon(mask)
        graphic = (
            (GraphicTypeValues.POLYLINE, polygon)
            if polygon is not None
            else (GraphicTypeValues.POINT, _centre_point(mask, shape))
        )
        region = ImageRegion(
            graphic_type=graphic[0],
            graphic_data=graphic[1],
            source_image=SourceImageForRegion(ct.SOPClassUID, ct.SOPInstanceUID),
        )
        # TID 1410 row 7 (Image Region) beside row 8 (Referenced Segmentation Frame): the
        # outline for viewers that draw regions only (OHIF#3390).
        items = group[0].ContentSequence
        at = next(
            (
                i + 1
                for i, it in enumerate(items)
                if it.ConceptNameCodeSequence[0].CodeValue == "121233"  # Source Image for Seg.
            ),
            len(items),
        )
        items.insert(at, region)
        groups.append(group)
    return groups


def build_sr(
    ct: Dataset,
    location: L3Location,
    composition: CompositionResult | None,
    seg: Segmentation | None,
) -> Comprehensive3DSR:
    """The TID 1500 measurement report of one analysis.

    Parameters
    ----------
    ct : the L3 CT image when L3 was found, else a representative image of the series
        (pydicom dataset; pixel data not needed). Patient and Study are copied from it.
    location : result of the locator.
    composition : measurements on the L3 slice, or None when L3 is not in the field of view.
    seg : the SEG built from ``composition`` (its segments are referenced), or None.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified report in a new series of the source study, with
        deterministic Series and SOP Instance UIDs.

    Raises
    ------
    ValueError
        ``composition`` is given without ``seg`` (or the reverse), or the SEG does not hold
        a frame for a compartment.
    """
    if (composition is None) != (seg is None):
        raise ValueError("composition and seg must be given together")
    series_uid = str(ct.SeriesInstanceUID)
    groups: list = [_localisation_group(ct, location, composition)]
    evidence: list[Dataset] = [ct]
    if composition is not None and seg is not None:
        groups.extend(_compartment_groups(ct, composition, seg))
        evidence.append(seg)
    report = MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=[c.PROCEDURE_REPORTED, c.PROCEDURE_CT],
        imaging_measurements=groups,
        referenced_images=[ct],
    )
    return Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=derived_uid(series_uid, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series_uid, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=sr_series_description(),
        coding_schemes=[
            CodingSchemeIdentificationItem(designator=c.L3SPOT_SCHEME, name=c.L3SPOT_SCHEME_NAME)
        ],
    )


def referenced_segment_numbers(groups: Sequence[Dataset]) -> list[int]:
    """Referenced Segment Numbers found in SR content items (for tests and checks)."""
    out: list[int] = []
    for item in groups:
        if "ReferencedSOPSequence" in item:
            for ref in item.ReferencedSOPSequence:
                if "ReferencedSegmentNumber" in ref:
                    out.extend(int(v) for v in np.atleast_1d(ref.ReferencedSegmentNumber))
        if "ContentSequence" in item:
            out.extend(referenced_segment_numbers(item.ContentSequence))
    return out
