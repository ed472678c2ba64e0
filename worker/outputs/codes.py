"""Coded concepts used by the SEG and the SR, each with its source.

Standard codes come from SNOMED CT (``SCT``), DICOM (``DCM``, PS3.16 Annex D) and UCUM. Where
no standard concept exists (the L3 localisation confidence, the skeletal muscle index, the
sarcopenia evaluation) l3spot uses a private coding scheme, ``99L3SPOT`` (PS3.16 section 8:
local coding schemes start with "99"), declared in the SR's Coding Scheme Identification
Sequence. ``docs/outputs.md`` explains every choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from core.labels import COMPARTMENT_NAMES, IMAT, SAT, SMA, VAT
from core.qa import qa_flag

#: Private coding scheme of l3spot (PS3.16 section 8, "99" prefix = local scheme).
L3SPOT_SCHEME = "99L3SPOT"
L3SPOT_SCHEME_NAME = "l3spot local codes"

# --- segmentation property categories and types (SEG, CID 7150 / CID 7151) ---

#: Property category of all four compartments: SCT 85756007 "Tissue" (CID 7150).
CATEGORY_TISSUE = CodedConcept("85756007", "SCT", "Tissue")

#: SCT 127954009 "Skeletal muscle" (CID 7166; pydicom ``codes.SCT.SkeletalMuscle``).
TYPE_SKELETAL_MUSCLE = CodedConcept("127954009", "SCT", "Skeletal muscle")

#: SCT 55603005 "Adipose tissue" (pydicom ``codes.SCT.AdiposeTissue``, meaning "Fat").
TYPE_ADIPOSE_TISSUE = CodedConcept("55603005", "SCT", "Adipose tissue")

#: SCT 67769002 "Subcutaneous fatty tissue": the SAT code of public tools (dcmqi examples,
#: TotalSegmentator-to-DICOM mappings).
TYPE_SUBCUTANEOUS_FAT = CodedConcept("67769002", "SCT", "Subcutaneous fatty tissue")

#: SCT 725274000 "Entire adipose tissue of abdomen": the visceral-fat code of the MGH/BWH
#: CCDS body-composition SEG (highdicom-based); no SNOMED concept names VAT more precisely.
TYPE_VISCERAL_FAT = CodedConcept("725274000", "SCT", "Entire adipose tissue of abdomen")

#: SCT 3138006 "Bone" (bone tissue; CID 7166, pydicom ``codes.SCT.BoneTissue``): the finding
#: of the L3 trabecular attenuation group. No SNOMED concept for "cancellous bone of the L3
#: vertebral body" is in pydicom's or highdicom's code dictionaries; the ROI is named by the
#: group's tracking identifier and the finding site (docs/outputs.md).
TYPE_BONE = CodedConcept("3138006", "SCT", "Bone")

# --- anatomy, measurements and units (SR, TID 1500 / TID 1410) ---

#: SCT 36470004 "L3 vertebra", the finding site of every measurement group.
L3_VERTEBRA = CodedConcept("36470004", "SCT", "L3 vertebra")
#: SCT 42798000 "Area" (CID 7470 linear/area measurements).
AREA = CodedConcept("42798000", "SCT", "Area")
#: DCM 112181 "Mean Attenuation Coefficient", in Hounsfield units (CID 7180).
MEAN_ATTENUATION = CodedConcept("112181", "DCM", "Mean Attenuation Coefficient")
#: SCT 386136009 "Standard deviation" as a derivation modifier (CID 7464).
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")
#: DCM 112039 "Tracking Identifier"
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier

UNIT_CM2 = CodedConcept("cm2", "UCUM", "square centimeter")
UNIT_HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_CM2_PER_M2 = CodedConcept("cm2/m2", "UCUM", "square centimeter per square meter")
UNIT_NONE = CodedConcept("1", "UCUM", "no units")

#: SCT 363679005 "Imaging procedure" (CID 100), the TID 1500 "Procedure reported".
PROCEDURE_REPORTED = CodedConcept("363679005", "SCT", "Imaging procedure")
#: SCT 77477000 "Computed tomography", the second "Procedure reported" value.
PROCEDURE_CT = CodedConcept("77477000", "SCT", "Computed tomography")

# --- the IHE IOCM rejection note (Key Object Selection, TID 2010; worker/outputs/ko.py) ---

#: DCM 113001 "Rejected for Quality Reasons" (CID 7010 Key Object Selection Document Title):
#: the title that tells an IOCM PACS to hide the referenced objects (IHE IOCM, RAD-66
#: "Rejection Note Stored").
REJECTED_FOR_QUALITY_REASONS = CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
#: DCM 113011 "Document Title Modifier" (TID 2010 row 2; CID 7011 with title 113001).
DOCUMENT_TITLE_MODIFIER = CodedConcept("113011", "DCM", "Document Title Modifier")
#: DCM 111219 "Inappropriate image processing" (CID 7011 Rejected for Quality Reasons): the
#: automated processing measured at a slice a reader judged not to be L3.
INAPPROPRIATE_IMAGE_PROCESSING = CodedConcept("111219", "DCM", "Inappropriate image processing")

#: Algorithm family of the SEG's algorithm identification (CID 7162).
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
INDETERMINATE = CodedConcept("82334004", "SCT", "Indeterminate")

# --- l3spot local codes (no standard concept exists) ---

#: Position of the chosen L3 slice along the slice normal (mm).
L3_SLICE_POSITION = CodedConcept("L3Z", L3SPOT_SCHEME, "L3 slice position along slice normal")
#: 0..1 confidence of the L3 localisation (correlation peak, Belharbi et al. 2017 3.3).
L3_CONFIDENCE = CodedConcept("L3CONF", L3SPOT_SCHEME, "L3 localisation confidence")
#: Is the L3 vertebra inside the scanned range? (value YES / NO)
L3_IN_FIELD_OF_VIEW = CodedConcept("L3FOV", L3SPOT_SCHEME, "L3 vertebra in field of view")
#: Was body composition at L3 measured? (value YES / NO; NO in a "not measured" report)
L3_MEASURED = CodedConcept("L3MEAS", L3SPOT_SCHEME, "Body composition at L3 measured")
#: Finding of the localisation group.
L3_LOCALISATION = CodedConcept("L3LOC", L3SPOT_SCHEME, "L3 slice localisation")
#: Title (TID 1500 row 1; CID 7021 is extensible) of a report that measured nothing: L3 not
#: in the field of view, or a series l3spot could not analyse. Not DCM 126000 "Imaging
#: Measurement Report", which tells viewers (OHIF) to expect measurement groups on images.
NOT_MEASURED_REPORT = CodedConcept("L3NMREPORT", L3SPOT_SCHEME, "L3 body composition not measured")
#: Why body composition at L3 was not measured (TEXT of a not-measured report, in full).
NOT_MEASURED_REASON = CodedConcept(
    "L3NMREASON", L3SPOT_SCHEME, "Why body composition at L3 was not measured"
)
#: UMLS C0034375 "Qualitative Evaluations": the report-level container of TID 1500 (row 12).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: SMA / height^2 (cm2/m2), Prado et al. 2008.
SKELETAL_MUSCLE_INDEX = CodedConcept("SMI", L3SPOT_SCHEME, "Skeletal muscle index")
#: Change since the patient's previous L3 measurement (issue 17; numeric, SMA group): SMA in
#: cm2 and %, SMI in cm2/m2 and %, days between the two study dates.
SMA_CHANGE = CodedConcept(
    "SMACHG", L3SPOT_SCHEME, "Change in skeletal muscle area since previous study"
)
SMA_CHANGE_PCT = CodedConcept(
    "SMACHGPCT", L3SPOT_SCHEME, "Relative change in skeletal muscle area since previous study"
)
SMI_CHANGE = CodedConcept(
    "SMICHG", L3SPOT_SCHEME, "Change in skeletal muscle index since previous study"
)
SMI_CHANGE_PCT = CodedConcept(
    "SMICHGPCT", L3SPOT_SCHEME, "Relative change in skeletal muscle index since previous study"
)
DAYS_SINCE_PREVIOUS = CodedConcept("PREVDAYS", L3SPOT_SCHEME, "Days since previous L3 measurement")
#: The change as one sentence (TEXT, TID 1500 row 14 of the report-level evaluations).
CHANGE_SUMMARY = CodedConcept("L3CHANGE", L3SPOT_SCHEME, "Change since previous L3 measurement")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
UNIT_DAY = CodedConcept("d", "UCUM", "day")
#: Sarcopenia by SMI cut-offs (value YES / NO / INDETERMINATE).
SARCOPENIA = CodedConcept("SARCO", L3SPOT_SCHEME, "Sarcopenia by L3 skeletal muscle index")
#: Quality-control flag raised by the analysis (value: :func:`qa_flag_value`).
QA_FLAG = CodedConcept("QAFLAG", L3SPOT_SCHEME, "Quality control flag")


def qa_flag_value(flag: str) -> CodedConcept:
    """The coded value of one QA flag (code and meaning from :data:`core.qa.QA_FLAGS`)."""
    code, meaning = qa_flag(flag)
    return CodedConcept(code, L3SPOT_SCHEME, meaning)


@dataclass(frozen=True)
class CompartmentCodes:
    """Everything coded about one compartment (segment and measurement group).

    Attributes
    ----------
    label : label value from :mod:`core.labels` (= SEG segment number).
    key : short key ("sma", "imat", "vat", "sat").
    name : human-readable name, used as Segment Label and Tracking Identifier.
    category : Segmented Property Category.
    type : Segmented Property Type, also the TID 1410 "Finding".
    anatomic_region : Anatomic Region of the segment, or None.
    """

    label: int
    key: str
    name: str
    category: CodedConcept
    type: CodedConcept
    anatomic_region: CodedConcept | None


#: label value -> codes, in segment-number order (SMA=1, IMAT=2, VAT=3, SAT=4).
COMPARTMENT_CODES: dict[int, CompartmentCodes] = {
    SMA: CompartmentCodes(
        SMA, "sma", COMPARTMENT_NAMES[SMA], CATEGORY_TISSUE, TYPE_SKELETAL_MUSCLE, None
    ),
    # IMAT: fat whose anatomic region is skeletal muscle (inside the fascia).
    IMAT: CompartmentCodes(
        IMAT,
        "imat",
        COMPARTMENT_NAMES[IMAT],
        CATEGORY_TISSUE,
        TYPE_ADIPOSE_TISSUE,
        TYPE_SKELETAL_MUSCLE,
    ),
    VAT: CompartmentCodes(
        VAT, "vat", COMPARTMENT_NAMES[VAT], CATEGORY_TISSUE, TYPE_VISCERAL_FAT, None
    ),
    SAT: CompartmentCodes(
        SAT, "sat", COMPARTMENT_NAMES[SAT], CATEGORY_TISSUE, TYPE_SUBCUTANEOUS_FAT, None
    ),
}
