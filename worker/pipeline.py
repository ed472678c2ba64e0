"""One series through the whole worker: load -> MIP -> locate L3 -> measure -> DICOM outputs.

:func:`analyze_series` is what the Celery task and ``l3spot analyze`` call. It writes into
``out_dir``: ``result.json`` (:class:`core.result.AnalysisResult`), ``seg.dcm`` (only when
L3 was found), ``sr.dcm``, ``sc.dcm`` and ``overview.png``; for NIfTI input also
``source/`` (the volume written as a DICOM CT series, so the derived objects reference real
SOP Instances).

L3 outside the scanned range is a normal result (``l3.in_field_of_view`` false, no
composition, no SEG, an SR and an SC saying so), never an error.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from core.atomic import write_atomically
from core.config import Config
from core.dicom import blank_malformed
from core.digest import file_sha256
from core.errors import AnalysisError, L3SpotError, SeriesValidationError, phi_safe_message
from core.followup import (
    MeasurementChange,
    MeasurementRow,
    PatientHistory,
    measurement_change,
    patient_key,
    study_date_iso,
)
from core.layout import OVERVIEW_FILE, RESULT_JSON, SC_FILE, SEG_FILE, SOURCE_DIR, SR_FILE
from core.logs import log_event
from core.model_registry import ModelRegistryError, active_locator
from core.result import (
    AlgorithmInfo,
    AnalysisResult,
    DerivedObjects,
    SourceInfo,
    composition_fields,
    l3_result,
)
from worker.composition.measure import CompositionResult, measure_composition
from worker.locator.locate import L3Location, load_stages, locate_l3
from worker.mip import FrontalMips, FrontalProjection, Mip, frontal_projection
from worker.outputs.equipment import name_model_version
from worker.outputs.fhir import export_observation
from worker.outputs.reference import image_label
from worker.outputs.render import render_not_measured, render_overview, render_summary
from worker.outputs.review import Correction, mark_verified, renumber
from worker.outputs.sc import build_sc
from worker.outputs.seg import build_seg
from worker.outputs.sr import build_not_measured_sr, build_sr
from worker.training.reviews import write_locator_mips
from worker.volume.convert import (  # noqa: F401 (NIFTI_*: names of the generated context)
    NIFTI_PATIENT_ID_PREFIX,
    NIFTI_PATIENT_NAME,
    NIFTI_SERIES_DESCRIPTION,
    nifti_context,
    nifti_uid_seed,
)
from worker.volume.load import CTVolume, PatientInfo, is_nifti, load_series

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


#: QA flag when L3 was found with a confidence below the threshold (``L3Location.low_confidence``).
LOW_CONFIDENCE_FLAG = "low_l3_confidence"

#: PNG encoder settings of ``overview.png``: zlib's Z_RLE strategy (PNG row filters, then
#: run lengths) encodes the flat panels of the picture in less than half the time of the
#: default deflate, for a file 10 to 40 % larger (0.32 -> 0.44 MB on the chest CT); the
#: pixels are the same.
OVERVIEW_PNG_OPTIONS: dict[str, int | bool] = {"optimize": False, "compress_type": zlib.Z_RLE}


@contextmanager
def _stage(timing: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = round(time.perf_counter() - t0, 4)


def _guard(series_uid: str, stage: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; turn unexpected exceptions into :class:`AnalysisError` for ``stage``."""
    try:
        return fn()
    except L3SpotError:
        raise
    except Exception as exc:  # any library failure becomes a failed job, with the UID
        raise AnalysisError(series_uid, stage, phi_safe_message(exc)) from exc


def _save(ds: Dataset, path: Path) -> None:
    """Write a DICOM file atomically (temporary name, then rename)."""
    write_atomically(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def _source_info(path: Path, volume: CTVolume, kind: str, sha: str | None) -> SourceInfo:
    p: PatientInfo = volume.patient
    return SourceInfo(
        input_path=str(path),
        kind=kind,  # type: ignore[arg-type]
        generated_context=kind == "nifti",
        n_slices=int(volume.hu.shape[0]),
        rows=int(volume.hu.shape[1]),
        columns=int(volume.hu.shape[2]),
        pixel_spacing_mm=(float(volume.pixel_spacing_mm[0]), float(volume.pixel_spacing_mm[1])),
        slice_spacing_mm=round(float(volume.slice_spacing_mm), 4),
        series_description=volume.series_description,
        manufacturer=volume.manufacturer,
        study_date=volume.study_date,
        patient_sex=p.sex,
        patient_age=p.age,
        patient_size_m=p.size_m,
        patient_weight_kg=p.weight_kg,
        content_sha256=sha,
        load_warnings=list(volume.warnings),
    )


def _input_label(input_path: Path | Sequence[Path]) -> Path:
    """The path that names an input: itself, or the folder of a list of series files."""
    if isinstance(input_path, Path):
        return input_path
    files = [Path(p) for p in input_path]
    return Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path()


def load_input(
    input_path: Path | Sequence[Path], out_dir: Path, config: Config
) -> tuple[CTVolume, SourceInfo]:
    """Load a DICOM series (folder or files) or a NIfTI file; NIfTI gets a generated context.

    Returns
    -------
    (CTVolume, SourceInfo)
        The volume has Study/Series UIDs and ``source_files`` (for NIfTI: the series written
        to ``out_dir/source/`` with UIDs seeded by the file's SHA-256).

    Raises
    ------
    SeriesValidationError
        The input is not a usable CT series (from :func:`worker.volume.load.load_series`).
    """
    min_slices = config.node.min_slices
    if isinstance(input_path, Path) and is_nifti(input_path):
        from worker.volume.write import write_ct_series

        volume = load_series(input_path, min_slices=min_slices)
        sha = file_sha256(input_path)
        volume = nifti_context(volume, sha)
        volume = write_ct_series(
            volume,
            out_dir / SOURCE_DIR,
            uid_seed=nifti_uid_seed(sha),
            series_description=NIFTI_SERIES_DESCRIPTION,
        )
        return volume, _source_info(input_path, volume, "nifti", sha)
    volume = load_series(input_path, min_slices=min_slices)
    if not volume.source_files or not volume.series_instance_uid:
        raise SeriesValidationError(
            volume.series_instance_uid, "loaded series has no source files or Series UID"
        )
    return volume, _source_info(_input_label(input_path), volume, "dicom", None)


def read_source_header(path: Path) -> Dataset:
    """The header of one source image (everything before Pixel Data).

    What SEG, SR and SC take from the source image (Patient, Study, Frame of Reference,
    Image Plane, UIDs) is all in the header; the pixels come from the loaded volume.
    """
    return pydicom.dcmread(path, stop_before_pixels=True)


def _read_source(
    volume: CTVolume, index: int, read: Callable[[Path], Dataset] = read_source_header
) -> Dataset:
    path = volume.source_files[index]
    try:
        return read(path)
    except Exception as exc:
        raise AnalysisError(
            volume.series_instance_uid, "dicom_out", f"cannot re-read source image {path}: {exc}"
        ) from exc


def analyze_series(
    input_path: Path | Sequence[Path],
    out_dir: Path,
    config: Config,
    *,
    project: Callable[[CTVolume], FrontalProjection] = frontal_projection,
    history: PatientHistory | None = None,
    l3_slice_index: int | None = None,
    correction: Correction | None = None,
) -> AnalysisResult:
    """Analyse one CT series and write its results into ``out_dir``.

    Parameters
    ----------
    input_path : folder holding one DICOM CT series, the files of one series (a series that
        shares its folder, :func:`worker.volume.discover.find_series`), or a
        ``.nii``/``.nii.gz`` file.
    out_dir : output folder (created); files are replaced atomically, so a re-run with the
        same algorithm version replaces its earlier results (UIDs are deterministic).
    config : the l3spot configuration (``locator``, ``composition``, ``analysis`` and
        ``node.min_slices`` are used).
    project : the frontal projection (:func:`worker.mip.frontal_projection`); the volume is
        projected once per analysis and resampled to the pixel size of each locator model
        (the first stage's MIP also feeds the overview). A test passes a counting wrapper.
    history : the patients' measurements (issue 17), or None (``l3spot analyze``, NIfTI):
        the change since the patient's previous study goes into the SR and the SC, and this
        measurement is recorded (:func:`follow_patient`).
    l3_slice_index : measure at this slice (0-based in ascending z, ``CTVolume.z_mm``)
        instead of the one the locator would choose: the locator's decision is skipped
        (its models still give the MIP's pixel size), the location is the reader's
        (:func:`forced_location`, confidence 1). A reader's correction (issue 17).
    correction : with ``l3_slice_index``, who chose the slice: the SEG, SR and SC get new
        SOP Instance UIDs and the SR is verified by the reader and references the SR it
        supersedes (:mod:`worker.outputs.review`).

    Returns
    -------
    AnalysisResult
        The record also written to ``out_dir/result.json``; ``timing_s`` holds seconds per
        stage (load, mip, locate, composition, dicom_out, total); "mip" is the projection
        and the resampling to every pixel size the locator models ask for, "locate"
        includes loading the models (cached after the first series).

    Raises
    ------
    SeriesValidationError
        The input cannot be turned into a valid CT volume.
    AnalysisError
        The locator, the composition or the output writing failed (with the stage and the
        Series Instance UID).
    """
    input_path = Path(input_path) if isinstance(input_path, str | Path) else tuple(input_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()
    device = config.analysis.device

    with _stage(timing, "load"):
        volume, source = load_input(input_path, out_dir, config)
    uid = volume.series_instance_uid
    log_event(logger, "analysis_started", series_instance_uid=uid, n_slices=source.n_slices)

    # the models decide the MIP pixel sizes (their window geometry); a weights problem fails
    # here, as stage "locator", before any work. The site's promoted locator version, if any
    # (core/model_registry.py), replaces the configured weights.
    t_models = time.perf_counter()
    try:
        locator_config, locator_version = active_locator(config)
    except ModelRegistryError as exc:
        raise AnalysisError(uid, "locator", str(exc)) from exc
    stages = load_stages(locator_config, device, uid)
    t_models = time.perf_counter() - t_models
    mips = FrontalMips(volume, project)
    with _stage(timing, "mip"):
        for pixel_mm in stages.pixel_sizes:
            _guard(uid, "mip", lambda px=pixel_mm: mips.at(px))
    mip = mips.at(stages.coarse.spec.pixel_mm)  # built above: the overview's MIP
    with _stage(timing, "locate"):
        if l3_slice_index is None:
            location: L3Location = _guard(
                uid, "locate", lambda: locate_l3(volume, locator_config, mips, device=device)
            )
        else:
            location = forced_location(volume, mip, l3_slice_index)
    timing["locate"] = round(timing["locate"] + t_models, 4)
    _keep_training_mips(out_dir, [mips.at(px) for px in stages.pixel_sizes], volume, history)
    composition: CompositionResult | None = None
    if location.in_field_of_view:
        if location.slice_index is None:
            raise AnalysisError(uid, "locate", "L3 in field of view but no slice index")
        idx = int(location.slice_index)
        with _stage(timing, "composition"):
            composition = _guard(
                uid,
                "composition",
                lambda: measure_composition(volume, idx, config.composition, device=device),
            )

    qa_flags: list[str] = list(composition.qa_flags) if composition is not None else []
    if location.low_confidence:
        qa_flags.append(LOW_CONFIDENCE_FLAG)
    qa_flags += location.level_flags
    qa_flags = list(dict.fromkeys(qa_flags))

    current, change = (
        follow_patient(volume, composition, history, locator_version)
        if history is not None and source.kind == "dicom" and composition is not None
        else (None, None)
    )
    with _stage(timing, "dicom_out"):
        derived = _guard(
            uid,
            "dicom_out",
            lambda: write_outputs(
                volume,
                mip,
                location,
                composition,
                qa_flags,
                out_dir,
                change=change,
                correction=correction,
                model_version=locator_version,
            ),
        )
    if history is not None and current is not None:
        try:
            history.store.record_measurement(current)
        except Exception as exc:  # noqa: BLE001 (the history is an extra; the result stands)
            log_event(
                logger,
                "patient_history_unavailable",
                logging.WARNING,
                series_instance_uid=uid,
                reason=phi_safe_message(exc),
            )
    timing["total"] = round(time.perf_counter() - t_all, 4)

    sop_uid = None
    if location.in_field_of_view and location.slice_index is not None:
        uids = volume.sop_instance_uids
        sop_uid = uids[location.slice_index] if location.slice_index < len(uids) else None
    result = AnalysisResult(
        status="done",
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=uid,
        l3=l3_result(location, sop_uid).model_copy(
            update={
                "instance_number": derived.reference_instance_number,
                "slice_location_mm": derived.reference_z_mm,
            }
            if location.in_field_of_view
            else {}
        ),
        **composition_fields(composition),  # type: ignore[arg-type]
        qa_flags=qa_flags,
        timing_s=timing,
        source=source,
        derived=derived,
        algorithm=AlgorithmInfo(locator_model=locator_version),
    )
    fhir_file = export_observation(
        result,
        out_dir,
        model_versions(config, locator_version),
        enabled=config.fhir.enabled,
        url=config.fhir.url,
        timeout_s=config.fhir.timeout_seconds,
    )
    if fhir_file is not None:
        result.derived.files["fhir"] = fhir_file.name
    write_atomically(out_dir / RESULT_JSON, lambda tmp: tmp.write_text(result.to_json()))
    log_event(
        logger,
        "analysis_done",
        series_instance_uid=uid,
        l3_in_field_of_view=location.in_field_of_view,
        l3_slice_index=location.slice_index,
        confidence=round(float(location.confidence), 3),
        qa_flags=qa_flags,
        timing_s=timing,
    )
    return result


def follow_patient(
    volume: CTVolume,
    composition: CompositionResult,
    history: PatientHistory,
    model_version: str,
) -> tuple[MeasurementRow | None, MeasurementChange | None]:
    """This series' measurement row and the change since the patient's previous study.

    The patient is the keyed hash of Patient ID and Issuer of Patient ID of the first
    source image (:func:`core.followup.patient_key`); the previous study is the latest one
    measured with an earlier Study Date. Neither the ID nor the key is logged.

    Returns
    -------
    (MeasurementRow or None, MeasurementChange or None)
        (None, None) without a Patient ID or a Study Date, or when the history cannot be
        read (logged, the analysis goes on); the change is None for a first study.
    """
    uid = volume.series_instance_uid
    try:
        header = read_source_header(volume.source_files[0])
        key = patient_key(
            history.secret,
            str(header.get("PatientID") or ""),
            str(header.get("IssuerOfPatientID") or ""),
        )
        date = study_date_iso(volume.study_date)
        if key is None or date is None:
            log_event(
                logger,
                "patient_not_followed",
                series_instance_uid=uid,
                reason="no Patient ID" if key is None else "no Study Date",
            )
            return None, None
        sma = composition.measures.get("sma")
        if sma is None:
            return None, None
        current = MeasurementRow(
            series_uid=uid,
            patient_key=key,
            study_uid=volume.study_instance_uid,
            study_date=date,
            sma_cm2=round(float(sma.area_cm2), 1),
            smi_cm2_m2=None
            if composition.smi_cm2_per_m2 is None
            else round(float(composition.smi_cm2_per_m2), 2),
            model_version=model_version,
            measured_at=time.time(),
        )
        previous = history.store.previous_measurement(key, date)
    except Exception as exc:  # noqa: BLE001 (the history is an extra; the result stands)
        log_event(
            logger,
            "patient_history_unavailable",
            logging.WARNING,
            series_instance_uid=uid,
            reason=phi_safe_message(exc),
        )
        return None, None
    change = measurement_change(previous, current) if previous is not None else None
    log_event(
        logger,
        "patient_followed",
        series_instance_uid=uid,
        previous_series_instance_uid=previous.series_uid if previous else None,
    )
    return current, change


def forced_location(volume: CTVolume, mip: Mip, slice_index: int) -> L3Location:
    """The L3 location a reader chose: slice ``slice_index``, in the field of view.

    Parameters
    ----------
    volume : the loaded series (slices in ascending z).
    mip : the frontal MIP the overview shows (its row of the slice is the L3 line).
    slice_index : 0-based index of the chosen slice in ``volume.z_mm``.

    Returns
    -------
    L3Location
        In the field of view, ``confidence`` 1 (a reader's decision), ``model`` "reader".

    Raises
    ------
    AnalysisError
        ``slice_index`` is not a slice of the series (stage "locate").
    """
    n = int(volume.hu.shape[0])
    if not 0 <= int(slice_index) < n:
        raise AnalysisError(
            volume.series_instance_uid,
            "locate",
            f"chosen L3 slice {slice_index} is outside the series (0..{n - 1})",
        )
    z = float(volume.z_mm[int(slice_index)])
    return L3Location(
        in_field_of_view=True,
        slice_index=int(slice_index),
        z_mm=z,
        mip_row=float(mip.z_to_row(z)),
        confidence=1.0,
        model="reader",
    )


def _keep_training_mips(
    out_dir: Path, mips: list[Mip], volume: CTVolume, history: PatientHistory | None
) -> None:
    """Keep the MIPs a reader's review can teach the locator with (issue 17,
    :func:`worker.training.reviews.write_locator_mips`); the patient group is the keyed
    patient hash when the site follows patients, else the Study Instance UID. A failure is
    logged and the analysis goes on (the file only matters for training)."""
    uid = volume.series_instance_uid
    try:
        group = None
        if history is not None and volume.source_files:
            header = read_source_header(volume.source_files[0])
            group = patient_key(
                history.secret,
                str(header.get("PatientID") or ""),
                str(header.get("IssuerOfPatientID") or ""),
            )
        write_locator_mips(out_dir, mips, group or f"study:{volume.study_instance_uid}")
    except Exception as exc:  # noqa: BLE001 (training data is an extra; the result stands)
        log_event(
            logger,
            "training_mips_not_kept",
            logging.WARNING,
            series_instance_uid=uid,
            reason=phi_safe_message(exc),
        )


def model_versions(config: Config, locator_version: str | None = None) -> dict[str, str]:
    """The models behind a result, by role (the FHIR Observation's Device versions): the
    locator version (:func:`core.model_registry.active_locator`; default: the configured
    weights' file names) and the composition method (with its weights)."""
    if locator_version is not None:
        out = {"locator": locator_version}
    else:
        out = {"locator": config.locator.weights.stem}
        if config.locator.refine_weights is not None:
            out["locator refinement"] = config.locator.refine_weights.stem
    method = config.composition.method
    out["composition"] = (
        f"{method} ({config.composition.unet_weights.stem})" if method == "unet" else method
    )
    return out


def write_outputs(
    volume: CTVolume,
    mip: Mip,
    location: L3Location,
    composition: CompositionResult | None,
    qa_flags: list[str],
    out_dir: Path,
    *,
    read_source: Callable[[Path], Dataset] = read_source_header,
    change: MeasurementChange | None = None,
    correction: Correction | None = None,
    model_version: str | None = None,
) -> DerivedObjects:
    """Write ``seg.dcm`` (L3 found only), ``sr.dcm``, ``sc.dcm`` and ``overview.png``.

    The reference image is the L3 source image, or the middle image of the series when L3 is
    not in the field of view. A stale ``seg.dcm`` from an earlier run is removed when L3 is
    no longer found.

    Parameters
    ----------
    read_source : reads the reference image's file (default: its header only,
        :func:`read_source_header`); called once, and SEG, SR and SC share the dataset.
    change : the change since the patient's previous study (:func:`follow_patient`), shown
        in the SR and the SC when L3 was measured.
    correction : a reader's correction: new SOP Instance UIDs, the SR verified by the
        reader with a reference to the SR it supersedes (:mod:`worker.outputs.review`).
    model_version : the locator version (:func:`core.model_registry.active_locator`), named
        in the SEG's and the SR's Software Versions (:func:`name_model_version`).

    Returns
    -------
    DerivedObjects
        UIDs and file names of what was written.

    Notes
    -----
    ``overview.png`` is written with zlib's run-length strategy (:data:`OVERVIEW_PNG_OPTIONS`):
    the same pixels as the default settings, a file 10 to 40 % larger, in less than half the
    time (the picture is mostly flat panels).
    """
    derived = DerivedObjects()
    in_fov = location.in_field_of_view and composition is not None
    if in_fov and location.slice_index is not None:
        index = int(location.slice_index)
    else:
        index = len(volume.source_files) // 2
    ref = _read_source(volume, index, read_source)
    # a malformed date, time, name or number (e.g. PatientBirthDate "1950-01-02") would make
    # highdicom refuse the derived objects: it is left empty there (the loader warned by name)
    blank_malformed(ref)
    reference = image_label(ref)
    derived.reference_instance_number = reference.instance_number
    derived.reference_z_mm = reference.z_mm

    # The SEG and the SR refer to the stored pixels of the L3 image: the label map goes back
    # from the canonical grid to the stored one (HFP, FFS, decubitus storage; no-op for HFS).
    stored = composition.on_grid(volume.in_plane.to_source) if composition is not None else None
    seg = None
    seg_path = out_dir / SEG_FILE
    if in_fov and stored is not None:
        seg = build_seg(ref, stored.labels, method=stored.method)
        if correction is not None:  # before the SR: it references the SEG's instance
            renumber(seg, correction, volume.series_instance_uid, "seg-instance")
        name_model_version(seg, model_version)
        _save(seg, seg_path)
        derived.seg_series_instance_uid = str(seg.SeriesInstanceUID)
        derived.seg_sop_instance_uid = str(seg.SOPInstanceUID)
        derived.files["seg"] = SEG_FILE
    elif seg_path.exists():
        seg_path.unlink()

    change = change if in_fov else None
    sr = build_sr(ref, location, stored if in_fov else None, seg, qa_flags, change=change)
    if correction is not None:
        mark_verified(sr, correction, volume.series_instance_uid)
    name_model_version(sr, model_version)
    _save(sr, out_dir / SR_FILE)
    derived.sr_series_instance_uid = str(sr.SeriesInstanceUID)
    derived.sr_sop_instance_uid = str(sr.SOPInstanceUID)
    derived.files["sr"] = SR_FILE

    hu_slice = volume.hu[index] if in_fov else None
    summary = render_summary(
        hu_slice,
        volume.pixel_spacing_mm,
        mip,
        location,
        composition if in_fov else None,
        qa_flags,
        volume.series_description,
        l3_image=reference if in_fov else None,
        change=change,
    )
    sc = build_sc(ref, summary)
    if correction is not None:
        renumber(sc, correction, volume.series_instance_uid, "sc-instance")
    _save(sc, out_dir / SC_FILE)
    derived.sc_series_instance_uid = str(sc.SeriesInstanceUID)
    derived.sc_sop_instance_uid = str(sc.SOPInstanceUID)
    derived.files["sc"] = SC_FILE

    overview = render_overview(summary, mip, location)
    png = Image.fromarray(np.asarray(overview))
    write_atomically(
        out_dir / OVERVIEW_FILE, lambda tmp: png.save(tmp, format="PNG", **OVERVIEW_PNG_OPTIONS)
    )
    derived.files["overview"] = OVERVIEW_FILE
    return derived


def write_not_measured(series_dir: Path, out_dir: Path, reason: str) -> bool:
    """Write the "not measured" SR and SC of a series whose analysis failed (issue 14, 7).

    Parameters
    ----------
    series_dir : the series folder (DICOM files); its first readable image gives Patient,
        Study and the seed of the derived UIDs.
    out_dir : where ``sr.dcm`` and ``sc.dcm`` go (created).
    reason : why the series was not measured (PHI-free).

    Returns
    -------
    bool
        False when no image of the folder has readable Study, Series and SOP Instance UIDs
        (nothing to attach a report to; nothing is written).
    """
    ref = None
    for path in sorted(Path(series_dir).glob("*.dcm")):
        try:
            ds = read_source_header(path)
        except Exception:  # noqa: BLE001 (an unreadable file: try the next one)
            continue
        if all(
            str(ds.get(k) or "")
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        ):
            ref = ds
            break
    if ref is None:
        return False
    blank_malformed(ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(build_not_measured_sr(ref, reason), out_dir / SR_FILE)
    picture = render_not_measured(reason, str(ref.get("SeriesDescription") or ""))
    _save(build_sc(ref, picture), out_dir / SC_FILE)
    return True
