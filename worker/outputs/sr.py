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
from skimage.measure import find_contours

from core import ALGORITHM_NAME, __version__
from core.derived import MANUFACTURER, MANUFACTURER_MODEL_NAME
from worker.composition.measure import CompositionResult
from worker.locator.locate import L3Location
from worker.outputs import codes as c
from worker.outputs.equipment import algorithm_equipment, equipment_attributes
from worker.outputs.reference import image_label
from worker.outputs.seg import compartment_tracking_uid
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

    Notes
    -----
    The work runs on the mask's bounding box with a one-pixel background margin: labelling,
    hole filling and marching squares give there exactly what they give on the whole image
    (same components in the same scan order, holes are background not connected to the
    margin, contour coordinates of a 0/1 image are multiples of 0.5, so shifting them back by
    the box's integer offset is exact), at a fraction of the cost on a 512 x 512 image.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    # box with a one-pixel margin of background (np.pad adds it where the box meets the edge)
    box = np.pad(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1)
    comp, n = ndimage.label(box)
    if n > 1:
        sizes = ndimage.sum_labels(box, comp, index=np.arange(1, n + 1))
        box = comp == (int(np.argmax(sizes)) + 1)
    filled = ndimage.binary_fill_holes(box)
    padded = np.pad(filled, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    contour = max(contours, key=len)  # (row, col) in padded-box coordinates, closed
    # -> coordinates in the whole image padded by one pixel (the box starts at row r0 - 1,
    # column c0 - 1, and both are padded by one): exact, and the simplification then runs
    # on the very numbers it would see on the whole image
    contour = contour + np.array([r0 - 1, c0 - 1], dtype=contour.dtype)
    contour = approximate_polygon(contour, tolerance=0.75)
    if len(contour) < 4:  # a single pixel: its four corners
        r, col = np.argwhere(filled)[0] + (r0 - 1, c0 - 1)
        square = [(col, r), (col + 1, r), (col + 1, r + 1), (col, r + 1), (col, r)]
        return np.asarray(square, dtype=np.float32)
    # padded (row, col) -> image (col, row): -1 for the padding, +0.5 for pixel centres
    pts = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1).astype(np.float32)
    pts[-1] = pts[0]
    return pts


def approximate_polygon(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a polygonal chain (as scikit-image computes it).

    The algorithm and its arithmetic are those of ``skimage.measure.approximate_polygon``
    (scikit-image 0.26, BSD-3-Clause, Copyright the scikit-image team), operation for
    operation, so the result is the same to the bit (a unit test compares them); it lives
    here because importing it from scikit-image imports ``scipy.signal`` (about 1 s of the
    first SR of a process) for a function that needs only numpy. Two savings that change no
    number: a segment with no point between its ends is skipped (there is nothing to test),
    and the segment's sine and cosine are computed once.

    Parameters
    ----------
    coords : (K, 2) float array of (row, col) points.
    tolerance : largest distance (pixels) of a dropped point from the simplified chain; 0 or
        less returns ``coords`` unchanged.

    Returns
    -------
    numpy.ndarray
        (L, 2) array, L <= K, the kept points of ``coords`` (first and last always kept).

    References
    ----------
    Douglas D, Peucker T. Algorithms for the reduction of the number of points required to
    represent a digitized line or its caricature. Cartographica 1973;10(2):112-22.
    """
    if tolerance <= 0:
        return coords
    chain = np.zeros(coords.shape[0], "bool")
    dists = np.zeros(coords.shape[0])  # distance of every point to its current segment
    chain[0] = True
    chain[-1] = True
    pos_stack = [(0, chain.shape[0] - 1)]
    while pos_stack:
        start, end = pos_stack.pop()
        if end - start < 2:  # no point between the two ends: nothing to test
            continue
        r0, c0 = coords[start, :]
        r1, c1 = coords[end, :]
        dr = r1 - r0
        dc = c1 - c0
        segment_angle = -np.arctan2(dr, dc)
        sin, cos = np.sin(segment_angle), np.cos(segment_angle)
        segment_dist = c0 * sin + r0 * cos
        segment_coords = coords[start + 1 : end, :]
        segment_dists = dists[start + 1 : end]
        # perpendicular distance where the point projects inside the segment, else the
        # distance to the nearer end point
        dr0 = segment_coords[:, 0] - r0
        dc0 = segment_coords[:, 1] - c0
        dr1 = segment_coords[:, 0] - r1
        dc1 = segment_coords[:, 1] - c1
        projected_lengths0 = dr0 * dr + dc0 * dc
        projected_lengths1 = -dr1 * dr - dc1 * dc
        perp = np.logical_and(projected_lengths0 > 0, projected_lengths1 > 0)
        eucl = np.logical_not(perp)
        segment_dists[perp] = np.abs(
            segment_coords[perp, 0] * cos + segment_coords[perp, 1] * sin - segment_dist
        )
        segment_dists[eucl] = np.minimum(
            np.sqrt(dc0[eucl] ** 2 + dr0[eucl] ** 2),
            np.sqrt(dc1[eucl] ** 2 + dr1[eucl] ** 2),
        )
        if np.any(segment_dists > tolerance):
            new_end = start + np.argmax(segment_dists) + 1
            pos_stack.append((new_end, end))
            pos_stack.append((start, new_end))
            chain[new_end] = True
    return coords[chain, :]


def _centre_point(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(1, 2) (column, row) of the centroid of ``mask`` (image centre when empty)."""
    if mask.any():
        r, col = ndimage.center_of_mass(mask)
    else:
        r, col = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return np.array([[col + 0.5, r + 0.5]], dtype=np.float32)


def _qa_evaluations(qa_flags: Sequence[str]) -> list[QualitativeEvaluation]:
    """One qualitative evaluation per QA flag (:data:`core.qa.QA_FLAGS`: code and meaning)."""
    return [QualitativeEvaluation(c.QA_FLAG, c.qa_flag_value(f)) for f in qa_flags]


def _localisation_group(
    ct: Dataset,
    location: L3Location,
    composition: CompositionResult | None,
    qa_flags: Sequence[str] = (),
) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    series_uid = str(ct.SeriesInstanceUID)
    conf = Measurement(
        name=c.L3_CONFIDENCE, value=round(float(location.confidence), 2), unit=c.UNIT_NONE
    )
    if not location.in_field_of_view:
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid(series_uid, "tracking", "l3"), identifier=NOT_IN_FOV_TEXT
            ),
            finding_type=c.L3_LOCALISATION,
            algorithm_id=_algorithm_id(),
            finding_sites=[FindingSite(c.L3_VERTEBRA)],
            measurements=[conf],
            qualitative_evaluations=[
                QualitativeEvaluation(c.L3_IN_FIELD_OF_VIEW, c.NO),
                *_qa_evaluations(qa_flags),
            ],
        )
    shape = (int(ct.Rows), int(ct.Columns))
    body = composition.labels > 0 if composition is not None else np.zeros(shape, dtype=bool)
    measurements = [conf]
    # the L3 image as the viewer names it: its own position (Slice Location, else the z of
    # Image Position (Patient)), not the locator's z between slices; its Instance Number
    label = image_label(ct)
    if label.z_mm is not None:
        measurements.insert(
            0, Measurement(name=c.L3_SLICE_POSITION, value=label.z_mm, unit=c.UNIT_MM)
        )
    identifier = "L3 localisation"
    if label.instance_number is not None:
        identifier = f"L3 localisation: image {label.instance_number}"
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(series_uid, "tracking", "l3"), identifier=identifier
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
        qualitative_evaluations=[
            QualitativeEvaluation(c.L3_IN_FIELD_OF_VIEW, c.YES),
            *_qa_evaluations(qa_flags),
        ],
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
        # values rounded to what is measured: 0.1 cm2, 0.1 HU, SMI to 0.01 cm2/m2
        measurements = [
            Measurement(name=c.AREA, value=round(float(tm.area_cm2), 1), unit=c.UNIT_CM2)
        ]
        if tm.mean_hu is not None:
            measurements.append(
                Measurement(
                    name=c.MEAN_ATTENUATION, value=round(float(tm.mean_hu), 1), unit=c.UNIT_HU
                )
            )
        if tm.sd_hu is not None:
            measurements.append(
                Measurement(
                    name=codes.DCM.AttenuationCoefficient,
                    value=round(float(tm.sd_hu), 1),
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
                        value=round(float(composition.smi_cm2_per_m2), 2),
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
    qa_flags: Sequence[str] = (),
) -> Comprehensive3DSR:
    """The TID 1500 measurement report of one analysis.

    Parameters
    ----------
    ct : the L3 CT image when L3 was found, else a representative image of the series
        (pydicom dataset; pixel data not needed). Patient and Study are copied from it.
    location : result of the locator.
    composition : measurements on the L3 slice, or None when L3 is not in the field of view.
    seg : the SEG built from ``composition`` (its segments are referenced), or None.
    qa_flags : the analysis's QA flags (:data:`core.qa.QA_FLAGS`), each written as a
        qualitative evaluation (l3spot code and meaning) of the L3 localisation group.

    Notes
    -----
    Values are rounded to what is measured: areas and HU to 0.1, confidence and SMI to 0.01.
    The localisation group names the L3 image as the viewer does (Instance Number in the
    tracking identifier, the image's own Slice Location as the position).

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
    groups: list = [_localisation_group(ct, location, composition, qa_flags)]
    evidence: list[Dataset] = [ct]
    if composition is not None and seg is not None:
        groups.extend(_compartment_groups(ct, composition, seg))
        evidence.append(seg)
    return _report(ct, groups, evidence)


def build_not_measured_sr(ct: Dataset, reason: str) -> Comprehensive3DSR:
    """The TID 1500 report of a CT series l3spot could not measure, and why (issue 14, 7).

    The radiologist can tell "not run" from "failed": one TID 1501 group, Finding L3
    localisation, ``99L3SPOT L3MEAS`` (body composition measured) = SCT No, and the reason as
    the group's Tracking Identifier (a TEXT item, so the whole reason fits). Same
    deterministic Series and SOP Instance UIDs as a measurement report of the series: it
    replaces an earlier report in the PACS, and a later successful run replaces it.

    Parameters
    ----------
    ct : a CT image of the series (pydicom dataset, pixel data not needed): Patient, Study
        and the seed of the derived UIDs come from it.
    reason : why the series was not measured (PHI-free: UIDs and rules, never values).
    """
    series_uid = str(ct.SeriesInstanceUID)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(series_uid, "tracking", "l3"), identifier=f"Not measured: {reason}"
        ),
        finding_type=c.L3_LOCALISATION,
        algorithm_id=_algorithm_id(),
        finding_sites=[FindingSite(c.L3_VERTEBRA)],
        qualitative_evaluations=[QualitativeEvaluation(c.L3_MEASURED, c.NO)],
    )
    return _report(ct, [group], [ct])


def _report(ct: Dataset, groups: list, evidence: list[Dataset]) -> Comprehensive3DSR:
    """The Comprehensive 3D SR holding ``groups``, in l3spot's SR series of ``ct``'s study."""
    series_uid = str(ct.SeriesInstanceUID)
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
        **equipment_attributes(),
        contributing_equipment=[algorithm_equipment()],
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
