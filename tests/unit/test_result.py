"""result.json shape (issue 5) and the research CSV row."""

from __future__ import annotations

import json

from core.result import (
    CSV_HEADER,
    AnalysisResult,
    SourceInfo,
    composition_fields,
    csv_safe,
    l3_result,
    result_csv_row,
)
from tests.support.outputs import fabricated_composition, fabricated_location


def _done() -> AnalysisResult:
    comp = fabricated_composition()
    return AnalysisResult(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        l3=l3_result(fabricated_location(), "1.2.3.4.13"),
        **composition_fields(comp),
        qa_flags=["body_truncated", "low_l3_confidence"],
        timing_s={"load": 0.5, "locate": 1.25},
        source=SourceInfo(input_path="/x", kind="dicom", patient_sex="F", n_slices=24),
    )


def test_json_has_the_issue_shape() -> None:
    data = json.loads(_done().to_json())
    for key in (
        "study_instance_uid",
        "series_instance_uid",
        "l3",
        "composition",
        "smi_cm2_per_m2",
        "sarcopenia",
        "qa_flags",
        "timing_s",
        "algorithm",
    ):
        assert key in data
    assert set(data["l3"]) >= {"in_field_of_view", "slice_index", "z_mm", "sop_instance_uid"}
    assert set(data["composition"]) == {"sma", "imat", "vat", "sat"}
    assert set(data["composition"]["sma"]) >= {"area_cm2", "mean_hu"}
    assert set(data["sarcopenia"]) >= {"cutoffs", "flag", "reason"}
    # the locator version is set by the pipeline (core/model_registry.py); none here
    assert data["algorithm"] == {"name": "l3spot", "version": "0.1.0", "locator_model": None}
    assert data["l3"]["slice_index"] == 12 and data["status"] == "done"
    assert AnalysisResult.model_validate_json(_done().to_json()) == _done()


def test_not_in_fov_result_has_null_slice_and_composition() -> None:
    r = AnalysisResult(
        study_instance_uid="1",
        series_instance_uid="2",
        l3=l3_result(fabricated_location(False), "ignored"),
        **composition_fields(None),
    )
    data = json.loads(r.to_json())
    assert data["l3"]["in_field_of_view"] is False
    assert data["l3"]["slice_index"] is None and data["l3"]["sop_instance_uid"] is None
    assert data["composition"] is None and data["sarcopenia"] is None


def test_csv_row_has_every_header_column_as_text() -> None:
    row = result_csv_row(_done())
    assert list(row) == list(CSV_HEADER)
    assert all(isinstance(v, str) for v in row.values())
    comp = fabricated_composition()
    assert float(row["sma_area_cm2"]) == round(comp.measures["sma"].area_cm2, 3)
    assert row["l3_in_field_of_view"] == "true" and row["l3_slice_index"] == "12"
    assert row["qa_flags"] == "body_truncated;low_l3_confidence"
    assert row["sarcopenia_flag"] == "false" and row["time_total_s"] == "1.75"
    assert "patient_name" not in row and "patient_id" not in row


def test_csv_text_cells_that_start_a_formula_are_quoted_numbers_are_not() -> None:
    """OWASP CSV injection: ``= + - @``, tab and CR lead a formula; ``-12.3`` is a number."""
    for text in ('=HYPERLINK("http://x/","y")', "+1+1", "-1+1", "@SUM(A1)", "\t=1", "\r=1", "-"):
        assert csv_safe(text) == "'" + text, text
    for text in ("-12.3", "+4", "-.5", "-1e-05", "abdomen =1", "", "045Y", "1.2.840.10008"):
        assert csv_safe(text) == text, text
    r = _done()
    assert r.source is not None and r.composition is not None
    r.source.series_description = "=cmd|' /C calc'!A0"
    r.source.input_path = "-x.dcm"
    r.composition["vat"].mean_hu = -87.25
    row = result_csv_row(r)
    assert row["series_description"] == "'=cmd|' /C calc'!A0"
    assert row["input_path"] == "'-x.dcm"
    assert row["vat_mean_hu"] == "-87.25"


def test_failed_record_and_row() -> None:
    r = AnalysisResult.failed("series 1.2: too few slices", series_instance_uid="1.2")
    row = result_csv_row(r)
    assert row["status"] == "failed" and "too few slices" in row["reason"]
    assert row["l3_in_field_of_view"] == "" and row["sma_area_cm2"] == ""
