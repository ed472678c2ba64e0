"""TID 1500 Measurement Report (Comprehensive 3D SR) of the L3 body composition.

Content tree of a measurement (PS3.16 TID 1500, with TID 1410 measurement groups):

- observer context: device observer "l3spot" (TID 1004), procedure reported;
- image library: the L3 CT image;
- one TID 1410 group "L3 localisation" with an SCOORD POINT on the L3 image: slice position
  (mm), confidence, "L3 in field of view" = Yes, the QA flags;
- one TID 1410 group per compartment (SMA, IMAT, VAT, SAT): tracking identifier and UID
  (the SEG segment's), finding = the segment's property type, finding site L3 vertebra
  (SCT 36470004), the SEG segment reference, a closed SCOORD POLYLINE (the outline) on the
  L3 image (OHIF draws only groups with an image region, OHIF#3390), Area (SCT 42798000,
  cm2), Mean Attenuation Coefficient (DCM 112181, [hnsf'U]) and its standard deviation;
  the SMA group also carries the skeletal muscle index and the sarcopenia evaluation when
  available;
- one TID 1410 group "L3 vertebral body trabecular bone" (issue 15) when it was measured:
  finding SCT 3138006 "Bone", finding site L3 vertebra, the ROI's outline, Mean Attenuation
  Coefficient ([hnsf'U]) and its SD, the ROI's area (:func:`_trabecular_group`).

A report that measured nothing (L3 not in the field of view, :func:`build_sr`; a series that
could not be analysed, :func:`build_not_measured_sr`) has no measurement group: nothing in it
is a region of an image. It is TID 1500 with the title 99L3SPOT L3NMREPORT "L3 body
composition not measured" (CID 7021 is extensible), the image library (the image the report
is about), and TID 1500's own report-level "Qualitative Evaluations" container (row 12): CODE
items (rows 13: measured = No, in field of view = No, the QA flags) and the reason as a TEXT
item (row 14), in full. OHIF 3.13.2 throws on a measurement group without an image region and
on a DCM 126000 report without a measurement group; it shows a report of any other title as
text (docs/outputs.md, "In OHIF").

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
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageLibrary,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegmentationFrame,
    RelationshipTypeValues,
    SourceImageForRegion,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage
from skimage.measure import find_contours

from core import ALGORITHM_NAME, __version__
from core.derived import MANUFACTURER, MANUFACTURER_MODEL_NAME
from core.followup import MeasurementChange
from worker.composition.measure import CompositionResult
from worker.locator.locate import L3Location
from worker.outputs import codes as c
from worker.outputs.equipment import algorithm_equipment, equipment_attributes
from worker.outputs.reference import image_label
from worker.outputs.seg import compartment_tracking_uid
from worker.outputs.uids import derived_uid, device_observer_uid

#: Series Number of the SR.
SR_SERIES_NUMBER = 9702

#: Start of the reason a report gives when L3 is outside the scan.
NOT_IN_FOV_TEXT = "L3 not in field of view"
#: Language of the reports (TID 1204), as highdicom writes it for the measurement report.
REPORT_LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")


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
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 "L3 localisation" group of a report whose L3 is in the field of view."""
    series_uid = str(ct.SeriesInstanceUID)
    conf = Measurement(
        name=c.L3_CONFIDENCE, value=round(float(location.confidence), 2), unit=c.UNIT_NONE
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


def _change_measurements(change: MeasurementChange) -> list[Measurement]:
    """The change since the previous study as TID 300 measurements of the SMA group."""
    out = [
        Measurement(name=c.SMA_CHANGE, value=change.sma_cm2, unit=c.UNIT_CM2),
        Measurement(name=c.SMA_CHANGE_PCT, value=change.sma_pct, unit=c.UNIT_PERCENT),
    ]
    if change.smi_cm2_m2 is not None and change.smi_pct is not None:
        out.append(Measurement(name=c.SMI_CHANGE, value=change.smi_cm2_m2, unit=c.UNIT_CM2_PER_M2))
        out.append(Measurement(name=c.SMI_CHANGE_PCT, value=change.smi_pct, unit=c.UNIT_PERCENT))
    out.append(Measurement(name=c.DAYS_SINCE_PREVIOUS, value=change.days, unit=c.UNIT_DAY))
    return out


def _compartment_groups(
    ct: Dataset,
    composition: CompositionResult,
    seg: Segmentation,
    change: MeasurementChange | None = None,
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
            if change is not None:
                measurements.extend(_change_measurements(change))
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


def _trabecular_group(
    ct: Dataset, composition: CompositionResult
) -> PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """The TID 1410 group of the L3 vertebral body's trabecular attenuation, or None.

    Finding SCT 3138006 "Bone", finding site SCT 36470004 "L3 vertebra", the ROI's outline
    as a closed SCOORD POLYLINE on the L3 image, Mean Attenuation Coefficient (DCM 112181,
    [hnsf'U]) with its standard deviation, and the ROI's Area (SCT 42798000, cm2) on one
    slice (:mod:`worker.composition.bone`: anterior 60 % of the body, 3 mm inside the
    cortex, pooled over the L3 slice and its neighbours within 3 mm). None when it was not
    measured: the reason stays in result.json. No threshold is reported (the published ones
    are for L1).
    """
    t = composition.trabecular
    if t is None or t.mean_hu is None or t.roi is None:
        return None
    polygon = region_polygon(t.roi)
    if polygon is None:
        return None
    measurements = [
        Measurement(name=c.MEAN_ATTENUATION, value=round(float(t.mean_hu), 1), unit=c.UNIT_HU),
        Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=round(float(t.sd_hu or 0.0), 1),
            unit=c.UNIT_HU,
            derivation=c.STANDARD_DEVIATION,
        ),
        Measurement(name=c.AREA, value=round(float(t.roi_area_cm2), 1), unit=c.UNIT_CM2),
    ]
    series_uid = str(ct.SeriesInstanceUID)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(series_uid, "tracking", "l3-trabecular"),
            identifier="L3 vertebral body trabecular bone",
        ),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=polygon,
            source_image=SourceImageForRegion(ct.SOPClassUID, ct.SOPInstanceUID),
        ),
        finding_type=c.TYPE_BONE,
        algorithm_id=_algorithm_id(),
        finding_sites=[FindingSite(c.L3_VERTEBRA)],
        measurements=measurements,
    )


def build_sr(
    ct: Dataset,
    location: L3Location,
    composition: CompositionResult | None,
    seg: Segmentation | None,
    qa_flags: Sequence[str] = (),
    change: MeasurementChange | None = None,
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
        qualitative evaluation (l3spot code and meaning): of the L3 localisation group, or of
        the report when L3 is not in the field of view.
    change : the change since the patient's previous measurement (issue 17), or None: its
        numbers as measurements of the SMA group (99L3SPOT SMACHG, SMACHGPCT, SMICHG,
        SMICHGPCT in cm2, %, cm2/m2, %; PREVDAYS in days) and the sentence
        (:meth:`MeasurementChange.text`) as a TEXT item 99L3SPOT L3CHANGE of TID 1500's
        report-level Qualitative Evaluations (rows 12 and 14).

    Notes
    -----
    Values are rounded to what is measured: areas and HU to 0.1, confidence and SMI to 0.01.
    The localisation group names the L3 image as the viewer does (Instance Number in the
    tracking identifier, the image's own Slice Location as the position).

    When L3 is not in the field of view the report measures nothing and has no measurement
    group (none would have an image region: OHIF 3.13.2 throws on such a group): title
    99L3SPOT L3NMREPORT, and in TID 1500's report-level Qualitative Evaluations (rows 12-14)
    "Body composition at L3 measured" = No, "L3 vertebra in field of view" = No, the reason
    (:func:`not_in_fov_text`: the locator's reason and its confidence) and the QA flags.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified report in a new series of the source study, with
        deterministic Series and SOP Instance UIDs.

    Raises
    ------
    ValueError
        ``composition`` is given without ``seg`` (or the reverse), or with L3 not in the
        field of view, or the SEG does not hold a frame for a compartment.
    """
    if (composition is None) != (seg is None):
        raise ValueError("composition and seg must be given together")
    if not location.in_field_of_view:
        if composition is not None:
            raise ValueError("no composition can be reported when L3 is not in the field of view")
        return _not_measured_report(
            ct,
            [
                _evaluation(c.L3_MEASURED, c.NO),
                _evaluation(c.L3_IN_FIELD_OF_VIEW, c.NO),
                _reason(not_in_fov_text(location)),
                *(_evaluation(c.QA_FLAG, c.qa_flag_value(f)) for f in qa_flags),
            ],
        )
    groups: list = [_localisation_group(ct, location, composition, qa_flags)]
    evidence: list[Dataset] = [ct]
    if composition is not None and seg is not None:
        groups.extend(_compartment_groups(ct, composition, seg, change))
        trabecular = _trabecular_group(ct, composition)
        if trabecular is not None:
            groups.append(trabecular)
        evidence.append(seg)
    sr = _report(ct, groups, evidence)
    if change is not None and composition is not None:
        qualitative = ContainerContentItem(
            name=c.QUALITATIVE_EVALUATIONS,
            relationship_type=RelationshipTypeValues.CONTAINS,
            is_content_continuous=False,
        )
        qualitative.ContentSequence = ContentSequence(
            [
                TextContentItem(
                    c.CHANGE_SUMMARY,
                    change.text(),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            ]
        )
        sr.ContentSequence.append(qualitative)  # TID 1500 row 12, after the measurements
    return sr


def not_in_fov_text(location: L3Location) -> str:
    """Why a report of a series whose L3 is outside the scan measured nothing.

    Parameters
    ----------
    location : the locator's result, ``in_field_of_view`` False.

    Returns
    -------
    str
        e.g. ``"L3 not in field of view: no window agrees on an L3 position (localisation
        confidence 0.12)"``: :data:`NOT_IN_FOV_TEXT`, the locator's reason when it gives one,
        and the confidence to 0.01 (the job page prints the same).
    """
    why = f": {location.reason}" if location.reason else ""
    return f"{NOT_IN_FOV_TEXT}{why} (localisation confidence {float(location.confidence):.2f})"


def build_not_measured_sr(ct: Dataset, reason: str) -> Comprehensive3DSR:
    """The TID 1500 report of a CT series l3spot could not measure, and why (issue 14, 7).

    The radiologist can tell "not run" from "failed": title 99L3SPOT L3NMREPORT "L3 body
    composition not measured", and in TID 1500's report-level Qualitative Evaluations
    (rows 12-14) ``99L3SPOT L3MEAS`` (body composition at L3 measured) = SCT No and the reason
    in full as a TEXT item (``99L3SPOT L3NMREASON``). No measurement group: there is nothing
    on an image to point at, and OHIF 3.13.2 throws on a group without an image region
    (issue 18). Same deterministic Series and SOP Instance UIDs as a measurement report of
    the series: it replaces an earlier report in the PACS, and a later successful run
    replaces it.

    Parameters
    ----------
    ct : a CT image of the series (pydicom dataset, pixel data not needed): Patient, Study
        and the seed of the derived UIDs come from it.
    reason : why the series was not measured (PHI-free: UIDs and rules, never values).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified report in l3spot's SR series of the source study.
    """
    return _not_measured_report(ct, [_evaluation(c.L3_MEASURED, c.NO), _reason(reason)])


def _evaluation(name: CodedConcept, value: CodedConcept) -> CodeContentItem:
    """TID 1500 row 13: a CODE item of the report-level Qualitative Evaluations."""
    return CodeContentItem(name, value, relationship_type=RelationshipTypeValues.CONTAINS)


def _reason(text: str) -> TextContentItem:
    """TID 1500 row 14: the reason nothing was measured, a TEXT item (UT: any length)."""
    return TextContentItem(
        c.NOT_MEASURED_REASON, text, relationship_type=RelationshipTypeValues.CONTAINS
    )


def _not_measured_report(
    ct: Dataset, evaluations: Sequence[CodeContentItem | TextContentItem]
) -> Comprehensive3DSR:
    """A TID 1500 report without measurements: the report-level Qualitative Evaluations only.

    Rows 1-5 as highdicom's ``MeasurementReport`` writes them (its constructor requires an
    Imaging Measurements container with at least one group, TID 1500 requires one of rows 6,
    10 and 12), then row 12 with ``evaluations``. Title :data:`codes.NOT_MEASURED_REPORT`;
    both containers are SEPARATE (each item a statement of its own, as a viewer lists them).
    """
    root = ContainerContentItem(
        name=c.NOT_MEASURED_REPORT, template_id="1500", is_content_continuous=False
    )
    items = ContentSequence()
    items.extend(LanguageOfContentItemAndDescendants(REPORT_LANGUAGE))  # row 2
    items.extend(_observation_context())  # row 3
    for procedure in (c.PROCEDURE_REPORTED, c.PROCEDURE_CT):  # row 4
        items.append(
            CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=procedure,
                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
    items.extend(ImageLibrary([ct]))  # row 5
    qualitative = ContainerContentItem(
        name=c.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    qualitative.ContentSequence = ContentSequence(list(evaluations))
    items.append(qualitative)  # row 12
    root.ContentSequence = items
    return _document(ct, root, [ct])


def _report(ct: Dataset, groups: list, evidence: list[Dataset]) -> Comprehensive3DSR:
    """The Comprehensive 3D SR holding ``groups``, in l3spot's SR series of ``ct``'s study."""
    report = MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=[c.PROCEDURE_REPORTED, c.PROCEDURE_CT],
        imaging_measurements=groups,
        referenced_images=[ct],
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
            REPORT_LANGUAGE
        ),
    )
    return _document(ct, report[0], evidence)


def _document(ct: Dataset, content: Dataset, evidence: list[Dataset]) -> Comprehensive3DSR:
    """The Comprehensive 3D SR of ``content`` (the TID 1500 root), in l3spot's SR series."""
    series_uid = str(ct.SeriesInstanceUID)
    return Comprehensive3DSR(
        evidence=evidence,
        content=content,
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


def report_evaluations(sr: Dataset) -> list[tuple[str, str]]:
    """The report-level Qualitative Evaluations of an SR (TID 1500 rows 12-14), in order.

    Parameters
    ----------
    sr : an SR data set (pydicom or highdicom).

    Returns
    -------
    list of (str, str)
        (concept name's Code Value, value) per item: the value's Code Value of a CODE item,
        the text of a TEXT item. Empty when the report has no such container (a measurement
        report keeps its evaluations in its measurement groups).
    """
    out: list[tuple[str, str]] = []
    for container in sr.ContentSequence:
        name = container.ConceptNameCodeSequence[0]
        if container.ValueType != "CONTAINER" or (name.CodeValue, name.CodingSchemeDesignator) != (
            c.QUALITATIVE_EVALUATIONS.value,
            c.QUALITATIVE_EVALUATIONS.scheme_designator,
        ):
            continue
        for item in container.get("ContentSequence", []):
            concept = str(item.ConceptNameCodeSequence[0].CodeValue)
            if item.ValueType == "CODE":
                out.append((concept, str(item.ConceptCodeSequence[0].CodeValue)))
            elif item.ValueType == "TEXT":
                out.append((concept, str(item.TextValue)))
    return out


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
