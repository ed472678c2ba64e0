"""Celery tasks: ``analyze_series`` and ``remeasure_series`` (queue ``analysis``) and
``export_results`` (queue ``export``).

They are thin wrappers around plain functions (:func:`run_analysis`, :func:`run_remeasure`,
:func:`run_export`) that take the configuration and the job store explicitly, so they can be
tested without a broker. They are idempotent: the pipeline's derived UIDs are deterministic,
results are replaced atomically in ``<results_dir>/<SeriesInstanceUID>/``, and the PACS
receives the same SOP Instance UIDs again (a correction: new ones, derived from its review).
A task carrying a token older than the job record's is a stale duplicate and does nothing.
Every failure ends in a ``failed`` job record with a reason; no exception from the pipeline
escapes to crash the worker.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
from celery import Task

from core.config import Config
from core.errors import AnalysisError, SeriesValidationError, phi_safe_message
from core.followup import PatientHistory
from core.jobs import CORRECTED_NOTE, ExportState, JobState, JobStore
from core.layout import (
    SR_FILE,
    next_version_dir,
    result_files,
    series_results_dir,
    version_dirs,
)
from core.logs import log_event
from core.queue import app, current_config, send_export
from worker.export import retry_delay, send_results

log = logging.getLogger(__name__)

L3_NOT_IN_FOV = "L3 not in field of view"


def run_pipeline(
    input_path: Path, out_dir: Path, config: Config, jobs: JobStore | None = None
) -> Any:
    """Run :func:`worker.pipeline.analyze_series` (imported lazily: torch is heavy); with
    ``jobs``, the patient's previous measurement is compared and this one recorded
    (``privacy.follow_patients``, issue 17)."""
    from worker.pipeline import analyze_series as pipeline_analyze

    history = PatientHistory.from_config(config, jobs) if jobs is not None else None
    return pipeline_analyze(input_path, out_dir, config, history=history)


def _note_from_result(result: Any) -> str | None:
    try:
        data = result.model_dump(mode="json")
    except AttributeError:
        data = result if isinstance(result, dict) else {}
    l3 = data.get("l3") or {}
    if l3.get("in_field_of_view") is False:
        return L3_NOT_IN_FOV
    return None


class Heartbeat:
    """Context manager: bump the job record's ``updated_at`` every ``interval_s`` seconds.

    The node's reconciliation (:meth:`core.jobs.JobStore.claim_stale`) takes a series
    whose ``analysing`` record stopped moving for ``broker.stale_running_seconds`` as lost
    (its worker died) and queues it again; a live analysis, however long, keeps its record
    moving from this daemon thread.

    Parameters
    ----------
    jobs : the job records.
    series_uid : Series Instance UID of the running analysis.
    token : the task's token (the heartbeat stops when it is superseded).
    interval_s : seconds between heartbeats.
    """

    def __init__(self, jobs: JobStore, series_uid: str, token: str | None, interval_s: float):
        self.jobs = jobs
        self.series_uid = series_uid
        self.token = token
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.jobs.heartbeat(self.series_uid, self.token):
                    log_event(log, "analysis_superseded", series_instance_uid=self.series_uid)
                    return
            except Exception:  # a locked or unreachable database must not stop the analysis
                log.exception("heartbeat_failed")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an earlier result (readers see old or new)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_analysis(
    series_dir: Path,
    config: Config,
    jobs: JobStore,
    enqueue_export: Callable[[str, str | None], None],
    token: str | None = None,
    pipeline: Callable[[Path, Path, Config], Any] | None = None,
) -> str:
    """Analyse one spooled series and queue its export.

    The new results replace the series' results folder; when a reader corrected the series
    (the folder keeps versions, :func:`core.layout.version_dirs`), the replaced result
    becomes the next version and the earlier ones stay.

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>``; its name is the Series Instance UID.
    config : the configuration.
    jobs : job records.
    enqueue_export : ``(series_uid, token)`` -> queue the export task.
    token : the job's queue token (None = run unconditionally, e.g. from a script).
    pipeline : replaces :func:`run_pipeline` (tests).

    Returns
    -------
    :attr:`JobState.DONE`, :attr:`JobState.EXPORTING`, :attr:`JobState.FAILED` (the state the
    job record was left in; equal to their strings) or "stale" (another run owns the job).
    """
    series_uid = series_dir.name
    if not jobs.start_analysis(series_uid, token, worker=f"{socket.gethostname()}/{os.getpid()}"):
        log_event(log, "analysis_stale_task_skipped", series_instance_uid=series_uid)
        return "stale"
    attempts = jobs.get(series_uid).run_attempts
    if attempts > config.analysis.max_attempts:
        reason = (
            f"analysis started {attempts - 1} times without finishing (the worker process "
            f"died each time); not run again (analysis.max_attempts="
            f"{config.analysis.max_attempts}); 'l3spot retry' runs it once more"
        )
        jobs.mark_failed(series_uid, reason)
        log_event(
            log, "analysis_given_up", logging.ERROR, series_instance_uid=series_uid, reason=reason
        )
        return JobState.FAILED
    log_event(log, "analysis_started", series_instance_uid=series_uid, attempt=attempts)
    results_root = config.node.resolved_results_dir()
    results_root.mkdir(parents=True, exist_ok=True)
    tmp = results_root / f".{series_uid}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with Heartbeat(jobs, series_uid, token, config.broker.heartbeat_seconds):
            result = (pipeline or functools.partial(run_pipeline, jobs=jobs))(
                series_dir, tmp, config
            )
    except (SeriesValidationError, AnalysisError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        jobs.mark_failed(series_uid, exc.reason)
        log_event(
            log,
            "analysis_failed",
            logging.WARNING,
            series_instance_uid=series_uid,
            reason=exc.reason,
        )
        report_not_measured(series_dir, series_uid, exc.reason, config, jobs, enqueue_export, token)
        return JobState.FAILED
    except Exception as exc:  # a bug or a corrupt input: record it, keep the worker alive
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"internal error: {phi_safe_message(exc)}"
        jobs.mark_failed(series_uid, reason)
        # the traceback's frames, not its message: a library message may quote patient data
        log_event(
            log,
            "analysis_crashed",
            logging.ERROR,
            series_instance_uid=series_uid,
            reason=reason,
            traceback="".join(traceback.format_tb(exc.__traceback__)),
        )
        report_not_measured(series_dir, series_uid, reason, config, jobs, enqueue_export, token)
        return JobState.FAILED
    final = series_results_dir(results_root, series_uid)
    if version_dirs(final):  # a reader corrected this series: its versions stay (issue 17)
        _keep_versions(final, tmp)
    _replace_dir(tmp, final)
    note = _note_from_result(result)
    return _finish_and_export(
        series_uid, note, config, jobs, enqueue_export, token, "analysis_done"
    )


def _finish_and_export(
    series_uid: str,
    note: str | None,
    config: Config,
    jobs: JobStore,
    enqueue_export: Callable[[str, str | None], None],
    token: str | None,
    event: str,
    **fields: Any,
) -> str:
    """Record a finished analysis (or re-measure) and queue its export; the new state.

    Returns ``"stale"`` when the series was re-queued while this run went on (its
    heartbeats were late): the newer run owns the record and the export, and our results
    are the same objects (deterministic UIDs).
    """
    destinations = config.export.destinations
    if not jobs.finish_analysis(series_uid, note, exporting=bool(destinations), token=token):
        log_event(log, "analysis_superseded", series_instance_uid=series_uid)
        return "stale"
    log_event(log, event, series_instance_uid=series_uid, note=note, **fields)
    if not destinations:
        return JobState.DONE
    jobs.start_export(series_uid, [d.label for d in destinations])
    enqueue_export(series_uid, token)
    return JobState.EXPORTING


def _keep_versions(final: Path, tmp: Path) -> Path | None:
    """Copy the result being replaced (and the versions it kept) into ``tmp``.

    ``final``'s current files go to ``tmp/v<N+1>`` (:func:`core.layout.next_version_dir`),
    its ``v1`` ... ``vN`` to ``tmp`` as they are. Returns the new version folder (in
    ``tmp``), or None when there was no result to keep.
    """
    if not final.is_dir():
        return None
    kept = version_dirs(final)
    for old in kept:
        shutil.copytree(old, tmp / old.name)
    target = tmp / next_version_dir(final).name
    target.mkdir()
    names = {p.name for p in kept}
    for item in final.iterdir():
        if item.name in names or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
    return target


def _prior_sr(final: Path) -> Any:
    """The reference to the SR a correction supersedes (``final/sr.dcm``), or None."""
    from worker.outputs.review import PriorDocument

    path = final / SR_FILE
    if not path.is_file():
        return None
    try:
        return PriorDocument.of(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # noqa: BLE001 (unreadable: the corrected SR names no predecessor)
        return None


def _reject_superseded(results_dir: Path, correction: Any, series_uid: str) -> None:
    """Write the IOCM rejection note of the objects the correction in ``results_dir``
    superseded (:func:`worker.outputs.ko.write_rejection_note`; sent with the result)."""
    from worker.outputs.ko import write_rejection_note

    note = write_rejection_note(results_dir, correction, series_uid)
    if note is not None:
        log_event(
            log,
            "rejection_note_written",
            series_instance_uid=series_uid,
            review_id=correction.review_id,
            sop_instance_uid=str(pydicom.dcmread(note, stop_before_pixels=True).SOPInstanceUID),
        )


def run_pipeline_at(
    input_path: Path,
    out_dir: Path,
    config: Config,
    l3_slice_index: int,
    correction: Any,
    jobs: JobStore | None = None,
) -> Any:
    """:func:`worker.pipeline.analyze_series` at a chosen L3 slice (imported lazily); with
    ``jobs``, the corrected measurement replaces the series' row in the patient's history."""
    from worker.pipeline import analyze_series as pipeline_analyze

    history = PatientHistory.from_config(config, jobs) if jobs is not None else None
    return pipeline_analyze(
        input_path,
        out_dir,
        config,
        l3_slice_index=l3_slice_index,
        correction=correction,
        history=history,
    )


def run_remeasure(
    series_dir: Path,
    review_id: int,
    slice_index: int,
    config: Config,
    jobs: JobStore,
    enqueue_export: Callable[[str, str | None], None],
    token: str | None = None,
    pipeline: Callable[..., Any] | None = None,
) -> str:
    """Measure a series again at the slice a reader chose as L3, and queue its export.

    The corrected SEG, SR and SC (new SOP Instance UIDs; the SR verified by the reader and
    referencing the one it supersedes: :mod:`worker.outputs.review`) replace the results
    folder's files; the replaced ones are kept in ``v<N>/`` (:func:`core.layout.version_dirs`).
    With ``export.reject_superseded`` (the default) an IHE IOCM rejection note of the replaced
    SEG, SR and SC (``ko.dcm``, :mod:`worker.outputs.ko`) is written and sent with them.
    A failure leaves the earlier results in place and the job ``failed`` with the reason.

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>``.
    review_id : the ``reviews`` row that asked for it (user, time; part of the UIDs).
    slice_index : the chosen L3 slice, 0-based in ascending z.
    config, jobs, enqueue_export, token : as :func:`run_analysis`.
    pipeline : replaces :func:`run_pipeline_at` (tests).

    Returns
    -------
    The state the job record was left in (as :func:`run_analysis`) or "stale".
    """
    from worker.outputs.review import Correction

    series_uid = series_dir.name
    if not jobs.start_analysis(series_uid, token, worker=f"{socket.gethostname()}/{os.getpid()}"):
        log_event(log, "remeasure_stale_task_skipped", series_instance_uid=series_uid)
        return "stale"
    review = jobs.review(review_id)
    results_root = config.node.resolved_results_dir()
    final = series_results_dir(results_root, series_uid)
    correction = Correction(
        review_id=review.id,
        user_name=review.user_name,
        organisation=config.web.review_organisation,
        verified_at=review.created_at,
        prior=_prior_sr(final),
    )
    log_event(
        log,
        "remeasure_started",
        series_instance_uid=series_uid,
        review_id=review_id,
        slice_index=slice_index,
    )
    results_root.mkdir(parents=True, exist_ok=True)
    tmp = results_root / f".{series_uid}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with Heartbeat(jobs, series_uid, token, config.broker.heartbeat_seconds):
            (pipeline or functools.partial(run_pipeline_at, jobs=jobs))(
                series_dir, tmp, config, slice_index, correction
            )
        _keep_versions(final, tmp)
        if config.export.reject_superseded:
            _reject_superseded(tmp, correction, series_uid)
    except Exception as exc:  # the earlier results stay; the job says why
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "reason", None) or phi_safe_message(exc)
        jobs.mark_failed(series_uid, f"re-measure at slice {slice_index} failed: {reason}")
        log_event(
            log,
            "remeasure_failed",
            logging.WARNING,
            series_instance_uid=series_uid,
            review_id=review_id,
            reason=reason,
        )
        return JobState.FAILED
    _replace_dir(tmp, final)
    note = f"{CORRECTED_NOTE} (review {review_id}, slice {slice_index})"
    return _finish_and_export(
        series_uid,
        note,
        config,
        jobs,
        enqueue_export,
        token,
        "remeasure_done",
        review_id=review_id,
    )


def report_not_measured(
    series_dir: Path,
    series_uid: str,
    reason: str,
    config: Config,
    jobs: JobStore,
    enqueue_export: Callable[[str, str | None], None],
    token: str | None,
) -> bool:
    """Write (and queue for delivery) the "not measured" SR and SC of a failed series.

    ``export.report_not_measured`` (on by default): the reader sees in the study that the
    series was analysed and why it has no numbers (issue 14, defect 7). The job stays
    ``failed`` with its reason; the export rows show the report's delivery. Returns True
    when a report was written. A failure here is logged and never hides the analysis's.
    """
    if not config.export.report_not_measured:
        return False
    results_root = config.node.resolved_results_dir()
    tmp = results_root / f".{series_uid}.report-{uuid.uuid4().hex[:8]}"
    try:
        from worker.pipeline import write_not_measured

        if not write_not_measured(series_dir, tmp, reason):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        _replace_dir(tmp, series_results_dir(results_root, series_uid))
    except Exception as exc:  # noqa: BLE001 (the report is a courtesy; the failure stands)
        shutil.rmtree(tmp, ignore_errors=True)
        log_event(
            log,
            "not_measured_report_failed",
            logging.WARNING,
            series_instance_uid=series_uid,
            error=phi_safe_message(exc),
        )
        return False
    log_event(log, "not_measured_report_written", series_instance_uid=series_uid)
    destinations = config.export.destinations
    if destinations:
        jobs.start_report_export(series_uid, [d.label for d in destinations])
        enqueue_export(series_uid, token)
    return True


def run_export(
    series_uid: str,
    config: Config,
    jobs: JobStore,
    send: Callable[..., Any] = send_results,
    resend: Callable[[str, str | None], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[str, float]:
    """One delivery attempt of a series' results to every destination not yet served.

    Parameters
    ----------
    series_uid : the source (CT) Series Instance UID; its results folder is sent.
    config : the configuration (``export``).
    jobs : the job records.
    send : one attempt to one destination (:func:`worker.export.send_results`; tests
        inject outcomes).
    resend : ``(series_uid, token)`` -> queue that series' export now. When an attempt
        reaches a destination that was failing, the other series waiting for it are
        claimed (:meth:`core.jobs.JobStore.claim_waiting_exports`) and sent through this
        instead of each waiting out its own back-off. None: no resend (scripts, tests).
    clock : Unix time (s) of each attempt (tests simulate hours of retries with it).

    Returns
    -------
    (outcome, countdown)
        ``("done", 0)``, ``("retry", seconds to wait)`` or ``("failed", 0)``. A destination
        is retried (:func:`worker.export.retry_delay`) until its delivery has been failing
        for ``export.retry_for_hours`` (or ``export.max_attempts``, when set, ran out); then
        the job record says which destination answered what.
    """
    rec = jobs.get(series_uid)
    # a failed analysis's "not measured" report: its delivery never changes the job's state
    report_only = rec.state == JobState.FAILED and rec.analysis_finished_at is None
    results = series_results_dir(config.node.resolved_results_dir(), series_uid)
    files = result_files(results)
    if not files:
        if not report_only:
            jobs.mark_failed(series_uid, f"no result objects in {results}")
        return "failed", 0.0
    calling = config.export_calling_ae_title()
    previous = {e.destination: e for e in rec.exports}
    retry_after: list[float] = []
    failures: list[str] = []
    for dest in config.export.destinations:
        label = dest.label
        prior = previous.get(label)
        if prior is not None and prior.state == ExportState.DONE:
            continue
        attempt = (prior.attempts if prior is not None else 0) + 1
        outcome = send(files, dest, calling, config.export.timeout_seconds)
        now = clock()
        first_failure = prior.first_failure_at if prior is not None else None
        failing_for = 0.0 if first_failure is None else now - first_failure
        delay = None if outcome.ok else retry_delay(attempt, failing_for, config.export)
        final = not outcome.ok and delay is None
        jobs.record_export_attempt(
            series_uid, label, outcome.ok, outcome.status, outcome.error, final=final, now=now
        )
        back = jobs.record_destination_attempt(
            label, outcome.reached, outcome.status, outcome.error, now=now
        )
        log_event(
            log,
            "export_attempt",
            logging.INFO if outcome.ok else logging.ERROR if final else logging.WARNING,
            series_instance_uid=series_uid,
            destination=label,
            attempt=attempt,
            ok=outcome.ok,
            kind=outcome.kind,
            status=outcome.status,
            error=outcome.error,
            stored=len(outcome.stored),
            retry_in_s=delay,
            failing_for_s=round(failing_for, 1),
            given_up=final,
        )
        if back and resend is not None:
            _resend_waiting(jobs, label, series_uid, resend)
        if outcome.ok:
            continue
        if delay is not None:
            retry_after.append(delay)
            continue
        limit = (
            f"export.max_attempts={config.export.max_attempts}; without it the delivery is "
            f"retried for export.retry_for_hours={config.export.retry_for_hours:g}"
            if config.export.max_attempts is not None
            and attempt >= config.export.max_attempts
            and failing_for < config.export.retry_for_hours * 3600.0
            else f"failing for {failing_for / 3600.0:.1f} h, "
            f"export.retry_for_hours={config.export.retry_for_hours:g}"
        )
        failures.append(
            f"export to {label} failed after {attempt} attempts ({limit}): "
            f"status {outcome.status or 'none'}: {outcome.error}"
        )
    if retry_after:
        return "retry", min(retry_after)
    if failures:
        reason = "; ".join(failures)
        jobs.mark_failed(
            series_uid, f"{rec.reason}; report not delivered: {reason}" if report_only else reason
        )
        return "failed", 0.0
    if report_only:
        jobs.finish_report_export(series_uid)
        log_event(log, "not_measured_report_delivered", series_instance_uid=series_uid)
        return "done", 0.0
    jobs.finish_export(series_uid)
    log_event(log, "export_done", series_instance_uid=series_uid, files=len(files))
    return "done", 0.0


def _resend_waiting(
    jobs: JobStore, label: str, series_uid: str, resend: Callable[[str, str | None], None]
) -> None:
    """``label`` answers again: send now every other series waiting for a retry to it."""
    claimed = jobs.claim_waiting_exports(label, exclude=series_uid)
    sent = 0
    for uid, token in claimed:
        try:
            resend(uid, token)
        except Exception as exc:  # broker down: the reconciliation sends it later
            log_event(
                log,
                "export_resend_failed",
                logging.WARNING,
                series_instance_uid=uid,
                destination=label,
                error=phi_safe_message(exc),
            )
            continue
        sent += 1
    log_event(
        log,
        "export_destination_back",
        series_instance_uid=series_uid,
        destination=label,
        resent=sent,
        waiting=len(claimed),
    )


def send_export_task(series_uid: str, token: str | None) -> None:
    """Queue :func:`export_results` for a series."""
    send_export(app, series_uid, token)


@app.task(
    name="worker.tasks.analyze_series",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def analyze_series(self: Task, series_dir: str, token: str | None = None) -> str:
    """Celery task (queue ``analysis``): :func:`run_analysis` on ``series_dir``."""
    config = current_config()
    jobs = JobStore.from_config(config)
    return run_analysis(Path(series_dir), config, jobs, send_export_task, token=token)


@app.task(
    name="worker.tasks.remeasure_series",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def remeasure_series(
    self: Task, series_dir: str, review_id: int, slice_index: int, token: str | None = None
) -> str:
    """Celery task (queue ``analysis``): :func:`run_remeasure` at a reader's L3 slice."""
    config = current_config()
    jobs = JobStore.from_config(config)
    return run_remeasure(
        Path(series_dir), review_id, slice_index, config, jobs, send_export_task, token=token
    )


@app.task(
    name="worker.tasks.export_results",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=None,
)
def export_results(self: Task, series_uid: str, token: str | None = None) -> str:
    """Celery task (queue ``export``): :func:`run_export`, re-queued with backoff on failure."""
    config = current_config()
    jobs = JobStore.from_config(config)
    rec = jobs.get(series_uid)
    if token is not None and rec.token is not None and rec.token != token:
        log_event(log, "export_stale_task_skipped", series_instance_uid=series_uid)
        return "stale"
    outcome, countdown = run_export(series_uid, config, jobs, resend=send_export_task)
    if outcome == "retry":
        raise self.retry(countdown=countdown, max_retries=None)
    return outcome
