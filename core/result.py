"""The record of one analysis: ``result.json`` (pydantic) and its CSV row.

The JSON shape is the contract of issue 5 (the web page, the job store and the research
export read it); fields may be added, never renamed. No patient name, ID or birth date is
stored here: the record may be shown and exported without them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from core import ALGORITHM_NAME, __version__


# What the record needs of the worker's results, as protocols: core imports nothing of the
# worker, not even for type hints (tests/unit/test_architecture.py), and the worker's
# L3Location / CompositionResult satisfy these structurally.
class LocatorOutcome(Protocol):
    """The locator's answer (:class:`worker.locator.coarse.L3Location`)."""

    @property
    def in_field_of_view(self) -> bool: ...
    @property
    def slice_index(self) -> int | None: ...
    @property
    def z_mm(self) -> float | None: ...
    @property
    def mip_row(self) -> float | None: ...
    @property
    def confidence(self) -> float: ...
    @property
    def confidence_raw(self) -> float | None: ...
    @property
    def confidence_calibrated(self) -> bool: ...
    @property
    def flag_below(self) -> float: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def verification(self) -> dict[str, Any] | None: ...


class CompartmentMeasure(Protocol):
    """One compartment's measure: area (cm^2), mean and SD (HU), pixel count."""

    @property
    def area_cm2(self) -> float: ...
    @property
    def mean_hu(self) -> float | None: ...
    @property
    def sd_hu(self) -> float | None: ...
    @property
    def pixel_count(self) -> int: ...


class SarcopeniaOutcome(Protocol):
    """The sarcopenia evaluation: cut-off set, flag, threshold (cm^2/m^2), reason."""

    @property
    def cutoffs(self) -> str: ...
    @property
    def flag(self) -> bool | None: ...
    @property
    def threshold_cm2_per_m2(self) -> float | None: ...
    @property
    def reason(self) -> str | None: ...


class TrabecularOutcome(Protocol):
    """The L3 trabecular attenuation (:class:`worker.composition.bone.TrabecularAttenuation`)."""

    @property
    def mean_hu(self) -> float | None: ...
    @property
    def sd_hu(self) -> float | None: ...
    @property
    def roi_area_cm2(self) -> float: ...
    @property
    def pixel_count(self) -> int: ...
    @property
    def slices(self) -> list[int]: ...
    @property
    def reason(self) -> str | None: ...


class CompositionOutcome(Protocol):
    """The composition at L3 (:class:`worker.composition.measure.CompositionResult`)."""

    @property
    def measures(self) -> Mapping[str, CompartmentMeasure]: ...
    @property
    def smi_cm2_per_m2(self) -> float | None: ...
    @property
    def smi_reason(self) -> str | None: ...
    @property
    def bmi_kg_per_m2(self) -> float | None: ...
    @property
    def sarcopenia(self) -> SarcopeniaOutcome | None: ...
    @property
    def method(self) -> str: ...
    @property
    def trabecular(self) -> TrabecularOutcome | None: ...


COMPARTMENT_KEYS = ("sma", "imat", "vat", "sat")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LevelVerificationOut(_Model):
    """What counting the vertebrae said about the located L3 (worker/locator/vertebrae.py).

    ``status``: "confirmed" (the located slice lies in the counted L3; in "correct" mode
    the measured slice is that body's middle, ``applied`` stays false: the level is the
    locator's), "corrected" (the
    count puts L3 elsewhere: with ``applied`` the measured slice is the counted one, else
    the locator's is kept and flagged), "unverified" (no count; ``reason`` says why),
    "counted" (the locator said L3 is not in the field of view, counting found it);
    with another status ``reason`` may carry a note (why the sacrum seen was not counted
    from).
    ``counted_by``: "ribs" (L3 = third vertebra below the last rib-bearing one, the
    convention) or "sacrum" (third above the sacrum, when no rib-bearing vertebra is in
    view). ``possible_transitional_anatomy``: both counts made and they disagree;
    ``lumbar_counted``: the non-rib-bearing vertebrae above the sacrum (5 typically).
    ``l3_from_ribs_mm``/``l3_from_sacrum_mm``: (bottom, top) z of L3 by each count (mm);
    ``locator_z_mm``: the locator's answer (mm); ``model``: the weights file;
    ``confidence_locator``: the first stage's P(within 10 mm) when the level calibration
    replaced it in ``L3Result.confidence`` (models/spine_fcn.md), else None.
    """

    status: Literal["confirmed", "corrected", "unverified", "counted"]
    counted_by: Literal["ribs", "sacrum"] | None = None
    applied: bool = False
    possible_transitional_anatomy: bool = False
    lumbar_counted: int | None = None
    locator_z_mm: float | None = None
    l3_from_ribs_mm: tuple[float, float] | None = None
    l3_from_sacrum_mm: tuple[float, float] | None = None
    reason: str | None = None
    model: str | None = None
    confidence_locator: float | None = None

    def text(self) -> str | None:
        """:func:`level_verification_text` of this verdict."""
        return level_verification_text(self.model_dump())


def level_verification_text(verification: Mapping[str, Any] | None) -> str | None:
    """One line for the reader on the level verification (issue 15), or None when none ran.

    The Secondary Capture (``worker/outputs/render.py``) and the web page's job view print
    it; ``verification`` is :attr:`L3Result.level_verification` as a dict (or the locator's
    ``L3Location.verification``).
    """
    if not verification:
        return None
    by = {"ribs": "from the last rib", "sacrum": "from the sacrum"}.get(
        verification.get("counted_by") or "", ""
    )
    n = verification.get("lumbar_counted")
    lumbar = f"; {n} lumbar vertebrae counted" if n is not None else ""
    status = verification.get("status")
    if status == "confirmed":
        return f"Level confirmed by counting vertebrae {by}{lumbar}"
    if status == "corrected" and verification.get("applied"):
        return f"Level set by counting vertebrae {by}{lumbar}"
    if status == "corrected":
        return f"Counting vertebrae {by} gives another level{lumbar}"
    if status == "counted":
        return f"L3 found by counting vertebrae {by}{lumbar}"
    return "Level not verified by counting vertebrae"


class L3Result(_Model):
    """Where L3 is.

    ``slice_index`` is 0-based in the series sorted by ascending z and ``z_mm`` is the
    locator's decision (between slices); ``instance_number`` and ``slice_location_mm`` name
    the L3 image as the viewer shows it (Instance Number, the image's own Slice Location or
    Image Position z): the SR and the Secondary Capture use those.

    ``confidence``: with ``confidence_calibrated`` true and L3 found, the probability that
    the slice is within 10 mm of the true mid-L3, calibrated on validation phantoms: on the
    level verification's verdict where a level calibration applies (models/spine_fcn.md),
    else on the first stage alone (``models/locator_cnn4.md``); otherwise the locator's raw
    score. ``confidence_raw``
    keeps the raw score (``corr**2 * agreement * presence``); ``confidence_flag_below`` is
    the threshold under which the ``low_l3_confidence`` QA flag is raised.
    """

    in_field_of_view: bool
    slice_index: int | None = None
    instance_number: int | None = None
    slice_location_mm: float | None = None
    z_mm: float | None = None
    sop_instance_uid: str | None = None
    confidence: float = 0.0
    confidence_raw: float | None = None
    confidence_calibrated: bool = False
    confidence_flag_below: float | None = None
    mip_row: float | None = None
    reason: str | None = None
    level_verification: LevelVerificationOut | None = None


class CompartmentResult(_Model):
    """One compartment on the L3 slice: area (cm^2) and radiodensity (HU)."""

    area_cm2: float
    mean_hu: float | None = None
    sd_hu: float | None = None
    pixel_count: int | None = None


class SarcopeniaOut(_Model):
    """Sarcopenia evaluation: ``flag`` None with a ``reason`` when undecidable."""

    cutoffs: str
    flag: bool | None = None
    reason: str | None = None
    threshold_cm2_per_m2: float | None = None


class TrabecularOut(_Model):
    """Trabecular attenuation of the L3 vertebral body (opportunistic bone-density marker).

    ``mean_hu`` and ``sd_hu`` in HU over an ROI in the anterior 60 % of the body, 3 mm
    inside its cortex (Pickhardt et al. 2013's ROI placement), pooled over
    ``slices_averaged``; ``roi_area_cm2`` is the ROI on one slice. No threshold is applied:
    the published ones are for L1 (docs/composition.md). ``mean_hu`` is None with a
    ``reason`` when it could not be measured.
    """

    mean_hu: float | None = None
    sd_hu: float | None = None
    roi_area_cm2: float | None = None
    pixel_count: int | None = None
    slices_averaged: list[int] = Field(default_factory=list)
    reason: str | None = None


class AlgorithmInfo(_Model):
    """Who made the result: l3spot's version and the locator version
    (:func:`core.model_registry.active_locator`: ``site-NNNN`` or ``shipped (...)``)."""

    name: str = ALGORITHM_NAME
    version: str = __version__
    locator_model: str | None = None


class SourceInfo(_Model):
    """What was analysed (no patient identifiers)."""

    input_path: str
    kind: Literal["dicom", "nifti"]
    generated_context: bool = False  # True for NIfTI: Patient/Study generated by l3spot
    n_slices: int | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: float | None = None
    series_description: str = ""
    manufacturer: str = ""
    study_date: str = ""
    patient_sex: str | None = None
    patient_age: str | None = None
    patient_size_m: float | None = None
    patient_weight_kg: float | None = None
    content_sha256: str | None = None  # NIfTI only: seeds the generated UIDs
    load_warnings: list[str] = Field(default_factory=list)


class DerivedObjects(_Model):
    """UIDs and file names of the derived DICOM objects (None when not written)."""

    seg_series_instance_uid: str | None = None
    seg_sop_instance_uid: str | None = None
    sr_series_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    sc_series_instance_uid: str | None = None
    sc_sop_instance_uid: str | None = None
    files: dict[str, str] = Field(default_factory=dict)  # kind -> file name in out_dir
    # the source image the objects refer to, as the viewer names it (the L3 image when L3
    # was found, else the middle image): Instance Number and its slice position in mm
    reference_instance_number: int | None = None
    reference_z_mm: float | None = None


class AnalysisResult(_Model):
    """Everything ``result.json`` holds (issue 5 shape plus status, source, derived)."""

    status: Literal["done", "failed"] = "done"
    reason: str | None = None
    study_instance_uid: str
    series_instance_uid: str
    l3: L3Result
    composition: dict[str, CompartmentResult] | None = None
    smi_cm2_per_m2: float | None = None
    smi_reason: str | None = None
    bmi_kg_per_m2: float | None = None
    sarcopenia: SarcopeniaOut | None = None
    composition_method: str | None = None
    l3_trabecular: TrabecularOut | None = None
    qa_flags: list[str] = Field(default_factory=list)
    timing_s: dict[str, float] = Field(default_factory=dict)
    algorithm: AlgorithmInfo = Field(default_factory=AlgorithmInfo)
    source: SourceInfo | None = None
    derived: DerivedObjects = Field(default_factory=DerivedObjects)

    def to_json(self) -> str:
        """The ``result.json`` text (indented, stable key order)."""
        return self.model_dump_json(indent=2)

    @classmethod
    def failed(
        cls,
        reason: str,
        *,
        study_instance_uid: str = "",
        series_instance_uid: str = "",
        source: SourceInfo | None = None,
        timing_s: dict[str, float] | None = None,
    ) -> AnalysisResult:
        """A record of a series that could not be analysed (status "failed")."""
        return cls(
            status="failed",
            reason=reason,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            l3=L3Result(in_field_of_view=False, confidence=0.0),
            source=source,
            timing_s=timing_s or {},
        )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def l3_result(location: LocatorOutcome, sop_instance_uid: str | None) -> L3Result:
    """The ``l3`` part of the record from the locator's result."""
    return L3Result(
        in_field_of_view=bool(location.in_field_of_view),
        slice_index=location.slice_index if location.in_field_of_view else None,
        z_mm=_finite(location.z_mm) if location.in_field_of_view else None,
        sop_instance_uid=sop_instance_uid if location.in_field_of_view else None,
        confidence=float(location.confidence),
        confidence_raw=None if location.confidence_raw is None else float(location.confidence_raw),
        confidence_calibrated=bool(location.confidence_calibrated),
        confidence_flag_below=float(location.flag_below),
        mip_row=_finite(location.mip_row) if location.in_field_of_view else None,
        reason=location.reason,
        level_verification=_verification(location),
    )


def _verification(location: LocatorOutcome) -> LevelVerificationOut | None:
    v = location.verification
    if not v or not location.in_field_of_view:
        return None
    fields = LevelVerificationOut.model_fields
    return LevelVerificationOut(**{k: val for k, val in v.items() if k in fields})


def composition_fields(composition: CompositionOutcome | None) -> dict[str, object]:
    """The composition-related fields of :class:`AnalysisResult` (keyword arguments)."""
    if composition is None:
        return {"composition": None, "smi_cm2_per_m2": None, "sarcopenia": None}
    sarc = composition.sarcopenia
    return {
        "composition": {
            key: CompartmentResult(
                area_cm2=float(tm.area_cm2),
                mean_hu=_finite(tm.mean_hu),
                sd_hu=_finite(tm.sd_hu),
                pixel_count=int(tm.pixel_count),
            )
            for key, tm in composition.measures.items()
        },
        "smi_cm2_per_m2": _finite(composition.smi_cm2_per_m2),
        "smi_reason": composition.smi_reason,
        "bmi_kg_per_m2": _finite(composition.bmi_kg_per_m2),
        "sarcopenia": None
        if sarc is None
        else SarcopeniaOut(
            cutoffs=sarc.cutoffs,
            flag=sarc.flag,
            reason=sarc.reason,
            threshold_cm2_per_m2=_finite(sarc.threshold_cm2_per_m2),
        ),
        "composition_method": composition.method,
        # getattr: a composition made before issue 15 (or a test's stand-in) has none
        "l3_trabecular": trabecular_out(getattr(composition, "trabecular", None)),
    }


def trabecular_out(t: TrabecularOutcome | None) -> TrabecularOut | None:
    """The ``l3_trabecular`` part of the record (None when it was not computed)."""
    if t is None:
        return None
    measured = t.mean_hu is not None
    return TrabecularOut(
        mean_hu=_finite(t.mean_hu),
        sd_hu=_finite(t.sd_hu),
        roi_area_cm2=round(float(t.roi_area_cm2), 2) if measured else None,
        pixel_count=int(t.pixel_count) if measured else None,
        slices_averaged=[int(i) for i in t.slices],
        reason=t.reason,
    )


#: Columns of the research CSV export, in order (one row per analysed series).
CSV_HEADER: tuple[str, ...] = (
    "status",
    "reason",
    "study_instance_uid",
    "series_instance_uid",
    "input_path",
    "study_date",
    "series_description",
    "patient_sex",
    "patient_age",
    "patient_size_m",
    "patient_weight_kg",
    "n_slices",
    "slice_spacing_mm",
    "l3_in_field_of_view",
    "l3_slice_index",
    "l3_z_mm",
    "l3_sop_instance_uid",
    "l3_confidence",
    *(f"{k}_{m}" for k in COMPARTMENT_KEYS for m in ("area_cm2", "mean_hu")),
    "smi_cm2_per_m2",
    "bmi_kg_per_m2",
    "sarcopenia_cutoffs",
    "sarcopenia_flag",
    "composition_method",
    "l3_trabecular_mean_hu",
    "qa_flags",
    "time_total_s",
    "algorithm_version",
)


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV
#: Injection": ``=``, ``+``, ``-``, ``@``, tab, carriage return).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
#: A plain decimal number (what ``_cell`` writes for floats and ints), signed.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_safe(text: str) -> str:
    """A text cell that a spreadsheet shows as text, never runs as a formula.

    A cell starting with one of :data:`FORMULA_PREFIXES` gets a leading single quote
    (OWASP, CSV Injection), unless the whole cell is a number (``-12.3`` stays a negative
    number). Everything else is returned unchanged.

    Parameters
    ----------
    text : the cell as written to the CSV.

    Returns
    -------
    str
        ``text``, or ``"'" + text``.
    """
    if not text.startswith(FORMULA_PREFIXES) or _NUMBER.fullmatch(text):
        return text
    return "'" + text


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{round(v, 3)}"
    return csv_safe(str(v))


def result_csv_row(result: AnalysisResult) -> dict[str, str]:
    """One CSV row (keys = :data:`CSV_HEADER`) of an analysis record.

    Empty strings stand for missing values; booleans are ``true``/``false``; areas in
    cm^2, HU, mm and cm^2/m^2 as in ``result.json``; QA flags joined with ``;``. Text cells
    pass :func:`csv_safe` (no formula runs when the CSV is opened in a spreadsheet).
    """
    src = result.source
    row: dict[str, object] = {
        "status": result.status,
        "reason": result.reason,
        "study_instance_uid": result.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "input_path": src.input_path if src else None,
        "study_date": src.study_date if src else None,
        "series_description": src.series_description if src else None,
        "patient_sex": src.patient_sex if src else None,
        "patient_age": src.patient_age if src else None,
        "patient_size_m": src.patient_size_m if src else None,
        "patient_weight_kg": src.patient_weight_kg if src else None,
        "n_slices": src.n_slices if src else None,
        "slice_spacing_mm": src.slice_spacing_mm if src else None,
        "l3_in_field_of_view": result.l3.in_field_of_view if result.status == "done" else None,
        "l3_slice_index": result.l3.slice_index,
        "l3_z_mm": result.l3.z_mm,
        "l3_sop_instance_uid": result.l3.sop_instance_uid,
        "l3_confidence": result.l3.confidence if result.status == "done" else None,
        "smi_cm2_per_m2": result.smi_cm2_per_m2,
        "bmi_kg_per_m2": result.bmi_kg_per_m2,
        "sarcopenia_cutoffs": result.sarcopenia.cutoffs if result.sarcopenia else None,
        "sarcopenia_flag": result.sarcopenia.flag if result.sarcopenia else None,
        "composition_method": result.composition_method,
        "l3_trabecular_mean_hu": result.l3_trabecular.mean_hu if result.l3_trabecular else None,
        "qa_flags": ";".join(result.qa_flags),
        "time_total_s": sum(result.timing_s.values()) if result.timing_s else None,
        "algorithm_version": result.algorithm.version,
    }
    for key in COMPARTMENT_KEYS:
        cr = (result.composition or {}).get(key)
        row[f"{key}_area_cm2"] = cr.area_cm2 if cr else None
        row[f"{key}_mean_hu"] = cr.mean_hu if cr else None
    return {k: _cell(row[k]) for k in CSV_HEADER}
