"""The measurements as a FHIR R4 Observation (body composition panel at L3), optionally POSTed.

One Observation per analysed series, written beside ``result.json`` as
:data:`core.layout.FHIR_OBSERVATION_FILE` when body composition was measured, and POSTed to
``fhir.url`` when ``fhir.enabled``. Its shape (``docs/outputs.md`` explains each choice):

- ``code``: the panel, and ``component``: SMA, IMAT, VAT and SAT areas (cm2), the skeletal
  muscle index (cm2/m2; a ``dataAbsentReason`` with the reason when the height is unknown)
  and the mean muscle attenuation (HU). No LOINC code names an area or a density measured
  at L3 on CT, so these codes are l3spot's own code system (:data:`CODE_SYSTEM`), each
  defined in ``docs/outputs.md`` by the same SNOMED CT concepts the DICOM SR uses
  (:mod:`worker.outputs.codes`); ``bodySite`` is SNOMED CT 36470004 (L3 vertebra) and
  ``method`` SNOMED CT 77477000 (computed tomography), as in the SR.
- ``subject``: a placeholder (no patient identifier leaves l3spot in the clear); the
  receiver links the Observation through ``derivedFrom``: the ImagingStudy with the Study
  Instance UID, which also holds the SR with the same measurements (``identifier``: the SR's
  SOP Instance UID, so a re-run with the same algorithm version names the same Observation).
- ``device``: a contained Device, l3spot with its version and the models' names.
- ``status``: ``final``, or ``preliminary`` when a QA flag asks the reader to check the
  result (the flags are in ``note``).

Validated with ``fhir.resources``' R4B model (R4B is R4 with technical corrections; the
Observation and Device elements used here are identical in R4 4.0.1 and R4B 4.3.0, and
fhir.resources ships no R4 package since version 7).
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core import ALGORITHM_NAME, __version__
from core.atomic import write_atomically
from core.errors import L3SpotError
from core.layout import FHIR_OBSERVATION_FILE
from core.logs import log_event
from core.qa import qa_flag
from core.result import AnalysisResult
from worker.outputs.codes import L3_VERTEBRA, PROCEDURE_CT

__all__ = [
    "CODE_SYSTEM",
    "COMPONENTS",
    "FhirExportError",
    "build_observation",
    "export_observation",
    "post_observation",
    "write_observation",
]

logger = logging.getLogger(__name__)

#: l3spot's FHIR code system (the ``.example`` top-level domain is reserved, RFC 2606: it
#: names no real server; it is an identifier, documented in docs/outputs.md).
CODE_SYSTEM = "http://l3spot.example/fhir/CodeSystem/body-composition"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

#: The panel (Observation.code).
PANEL = ("l3-body-composition", "Body composition at the third lumbar vertebra by CT")

#: Components: key -> (code, display, UCUM unit). The key says where the value comes from in
#: result.json: "<compartment>_area", "sma_mean_hu" or "smi".
COMPONENTS: dict[str, tuple[str, str, str]] = {
    "sma_area": ("sma-area", "Skeletal muscle area at L3", "cm2"),
    "smi": ("smi", "Skeletal muscle index at L3 (area / height squared)", "cm2/m2"),
    "vat_area": ("vat-area", "Visceral adipose tissue area at L3", "cm2"),
    "sat_area": ("sat-area", "Subcutaneous adipose tissue area at L3", "cm2"),
    "imat_area": ("imat-area", "Intermuscular adipose tissue area at L3", "cm2"),
    "sma_mean_hu": ("sma-mean-hu", "Mean skeletal muscle attenuation at L3", "[hnsf'U]"),
}
_UNIT_TEXT = {"cm2": "cm2", "cm2/m2": "cm2/m2", "[hnsf'U]": "HU"}

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


class FhirExportError(L3SpotError):
    """The Observation could not be built or sent (never fails the analysis)."""


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(float(value), 2), "unit": _UNIT_TEXT[unit], "system": UCUM, "code": unit}


def _study_date(da: str) -> str | None:
    """DICOM DA (YYYYMMDD) as a FHIR date, None when absent or malformed."""
    m = _DA.match(da or "")
    if not m:
        return None
    try:
        return datetime(int(m[1]), int(m[2]), int(m[3])).date().isoformat()
    except ValueError:
        return None


def _components(result: AnalysisResult) -> list[dict[str, Any]]:
    comp = result.composition or {}
    values: dict[str, float | None] = {
        f"{key}_area": (comp[key].area_cm2 if key in comp else None)
        for key in ("sma", "vat", "sat", "imat")
    }
    values["smi"] = result.smi_cm2_per_m2
    values["sma_mean_hu"] = comp["sma"].mean_hu if "sma" in comp else None
    out = []
    for key, (code, display, unit) in COMPONENTS.items():
        c: dict[str, Any] = {
            "code": {"coding": [_coding(CODE_SYSTEM, code, display)], "text": display}
        }
        value = values[key]
        if value is not None:
            c["valueQuantity"] = _quantity(value, unit)
        else:
            why = result.smi_reason if key == "smi" else None
            c["dataAbsentReason"] = {
                "coding": [_coding(DATA_ABSENT_REASON, "not-performed", "Not Performed")],
                "text": why or "not measured",
            }
        out.append(c)
    return out


def build_observation(
    result: AnalysisResult,
    models: Mapping[str, str] | None = None,
    *,
    issued: datetime | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Observation of one analysed series, validated, as JSON-ready data.

    Parameters
    ----------
    result : a "done" analysis with body composition measured (``result.composition``) and
        the SR written (``result.derived.sr_sop_instance_uid``).
    models : name -> version of the models behind the result (the contained Device's
        versions besides l3spot's own), e.g. ``{"locator": "locator_cnn4_round3"}``.
    issued : when the result was made available (default: now, UTC).

    Returns
    -------
    dict
        The Observation (``resourceType`` "Observation"), as ``fhir.resources`` serialises
        it after validation.

    Raises
    ------
    FhirExportError
        ``result`` has no measurement, or the built resource does not validate.
    """
    from fhir.resources.R4B.observation import Observation

    if result.status != "done" or not result.composition:
        raise FhirExportError(
            "no body composition measured: no Observation", series_uid=result.series_instance_uid
        )
    sr_uid = result.derived.sr_sop_instance_uid
    versions = [{"type": {"text": "software"}, "value": f"{ALGORITHM_NAME} {__version__}"}]
    versions += [{"type": {"text": name}, "value": v} for name, v in (models or {}).items()]
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "contained": [
            {
                "resourceType": "Device",
                "id": "l3spot",
                "deviceName": [{"name": ALGORITHM_NAME, "type": "model-name"}],
                "type": {"text": "Body composition analysis software (L3 on CT)"},
                "version": versions,
            }
        ],
        "status": "preliminary" if result.qa_flags else "final",
        "category": [
            {"coding": [_coding(OBSERVATION_CATEGORY, "imaging", "Imaging")], "text": "Imaging"}
        ],
        "code": {"coding": [_coding(CODE_SYSTEM, *PANEL)], "text": PANEL[1]},
        "subject": {
            "type": "Patient",
            "display": "placeholder: the patient of the DICOM study in derivedFrom",
        },
        "issued": (issued or datetime.now(UTC)).isoformat(timespec="seconds"),
        "device": {"reference": "#l3spot"},
        "bodySite": {
            "coding": [_coding(SNOMED, L3_VERTEBRA.value, L3_VERTEBRA.meaning)],
            "text": "L3 vertebra",
        },
        "method": {
            "coding": [_coding(SNOMED, PROCEDURE_CT.value, PROCEDURE_CT.meaning)],
            "text": "CT",
        },
        "derivedFrom": [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": DICOM_UID,
                    "value": f"urn:oid:{result.study_instance_uid}",
                },
                "display": f"DICOM study: CT series {result.series_instance_uid}"
                + (f", TID 1500 SR {sr_uid}" if sr_uid else ""),
            }
        ],
        "component": _components(result),
    }
    if sr_uid:
        data["identifier"] = [{"system": DICOM_UID, "value": f"urn:oid:{sr_uid}"}]
    effective = _study_date(result.source.study_date if result.source else "")
    if effective:
        data["effectiveDateTime"] = effective
    if result.qa_flags:
        data["note"] = [{"text": f"QA: {qa_flag(f).meaning}"} for f in result.qa_flags]
    try:
        obs = Observation.model_validate(data)
    except ValueError as exc:
        raise FhirExportError(
            f"Observation does not validate: {exc}", series_uid=result.series_instance_uid
        ) from exc
    return obs.model_dump(mode="json", exclude_none=True)


def write_observation(
    result: AnalysisResult, out_dir: Path, models: Mapping[str, str] | None = None
) -> Path | None:
    """Write :data:`core.layout.FHIR_OBSERVATION_FILE` into ``out_dir`` (atomically).

    Returns
    -------
    Path or None
        The file; None when nothing was measured (a stale file of an earlier run is then
        removed).

    Raises
    ------
    FhirExportError
        The resource does not validate.
    """
    import json

    path = Path(out_dir) / FHIR_OBSERVATION_FILE
    if result.status != "done" or not result.composition:
        path.unlink(missing_ok=True)
        return None
    obs = build_observation(result, models)
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obs, indent=2)))


def post_observation(
    observation_json: bytes, base_url: str, timeout_s: float, series_uid: str = ""
) -> int:
    """POST an Observation to ``<base_url>/Observation`` (FHIR RESTful create).

    A conditional create (``If-None-Exist`` on the identifier, FHIR R4 3.1.0.8.1): a server
    that supports it does not store a second copy when the same result is sent again.

    Parameters
    ----------
    observation_json : the resource as JSON bytes.
    base_url : the FHIR server's base URL (``fhir.url``).
    timeout_s : connect and read timeout (s).
    series_uid : for the error.

    Returns
    -------
    int
        The HTTP status (2xx).

    Raises
    ------
    FhirExportError
        Connection failure, timeout or a non-2xx answer (with the status and the start of
        the server's OperationOutcome).
    """
    import json

    url = base_url.rstrip("/") + "/Observation"
    headers = {
        "Content-Type": "application/fhir+json; charset=utf-8",
        "Accept": "application/fhir+json",
    }
    ident = (json.loads(observation_json).get("identifier") or [{}])[0]
    if ident.get("value"):
        headers["If-None-Exist"] = f"identifier={ident['system']}|{ident['value']}"
    request = urllib.request.Request(url, data=observation_json, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode("utf-8", "replace")
        raise FhirExportError(
            f"FHIR server answered {exc.code} to POST {url}: {body}", series_uid=series_uid
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FhirExportError(
            f"cannot POST to {url}: {type(exc).__name__}: {reason}", series_uid=series_uid
        ) from exc


def export_observation(
    result: AnalysisResult,
    out_dir: Path,
    models: Mapping[str, str],
    *,
    enabled: bool,
    url: str | None,
    timeout_s: float,
) -> Path | None:
    """Write the Observation and, when ``enabled``, POST it; never raises.

    Every failure is logged (``fhir_export_failed``) and the analysis goes on: the FHIR
    copy is a convenience beside the DICOM SR, which stays the record.

    Returns
    -------
    Path or None
        The file written, None when nothing was measured or writing failed.
    """
    uid = result.series_instance_uid
    try:
        path = write_observation(result, out_dir, models)
    except Exception as exc:  # noqa: BLE001 (never fail the analysis)
        log_event(
            logger, "fhir_export_failed", series_instance_uid=uid, stage="write", reason=str(exc)
        )
        return None
    if path is None or not enabled or not url:
        return path
    try:
        status = post_observation(path.read_bytes(), url, timeout_s, uid)
    except Exception as exc:  # noqa: BLE001
        log_event(
            logger, "fhir_export_failed", series_instance_uid=uid, stage="post", reason=str(exc)
        )
    else:
        log_event(logger, "fhir_export_sent", series_instance_uid=uid, http_status=status)
    return path
