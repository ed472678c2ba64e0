"""Tasks: analysis results replace earlier ones, failures end in records, exports retry and fail.

The real pipeline (worker.pipeline) is replaced here by a tiny stand-in; the integration
test (tests/test_integration_node.py) runs the real one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from core.config import Config
from core.errors import SeriesValidationError
from core.jobs import DestinationState, ExportState, JobState, JobStore
from worker import tasks
from worker.export import ExportOutcome, FailureKind

SERIES = "1.2.826.0.1.3680043.8.498.7"


class FakeResult:
    def __init__(self, in_fov: bool) -> None:
        self.in_fov = in_fov

    def model_dump(self, mode: str = "json") -> dict[str, Any]:
        return {"l3": {"in_field_of_view": self.in_fov}}


def stand_in(in_fov: bool = True, marker: str = "1"):  # type: ignore[no-untyped-def]
    def pipeline(input_path: Path, out_dir: Path, config: Config) -> FakeResult:
        names = ("seg.dcm", "sr.dcm", "sc.dcm") if in_fov else ("sr.dcm", "sc.dcm")
        for n in names:
            (out_dir / n).write_text(marker)
        (out_dir / "result.json").write_text(json.dumps({"marker": marker}))
        return FakeResult(in_fov)

    return pipeline


PACS = "PACS@127.0.0.1:4242"


def _config(tmp_path: Path, destinations: bool = True, attempts: int | None = 3) -> Config:
    export: dict[str, Any] = {
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
        if destinations
        else [],
    }
    if attempts is not None:
        export |= {"max_attempts": attempts, "backoff_initial_seconds": 1}
    return Config.model_validate({"node": {"spool_dir": tmp_path / "spool"}, "export": export})


REFUSED = ExportOutcome(
    False,
    None,
    f"{PACS}: connection refused by 127.0.0.1:4242 (no DICOM service listens there)",
    kind=FailureKind.CONNECTION_REFUSED,
)


def refused(*a: Any) -> ExportOutcome:
    return REFUSED


def accepted(*a: Any) -> ExportOutcome:
    return ExportOutcome(True)


def _analysed(tmp_path: Path, cfg: Config, jobs: JobStore, series: str = SERIES) -> str:
    """A series analysed (stand-in pipeline) and waiting for its export; returns its token."""
    d = tmp_path / "spool" / "1.2.3" / series
    d.mkdir(parents=True, exist_ok=True)
    token = jobs.mark_queued(series, 30)
    assert tasks.run_analysis(d, cfg, jobs, lambda s, t: None, token, stand_in()) == "exporting"
    return token


@pytest.fixture()
def series_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool" / "1.2.3" / SERIES
    d.mkdir(parents=True)
    return d


def test_analysis_writes_results_then_queues_export(tmp_path: Path, series_dir: Path) -> None:
    cfg = _config(tmp_path)
    jobs = JobStore(cfg.node.spool_dir)
    token = jobs.mark_queued(SERIES, 30)
    exports: list[tuple[str, str | None]] = []
    out = tasks.run_analysis(
        series_dir, cfg, jobs, lambda s, t: exports.append((s, t)), token, stand_in()
    )
    assert out == "exporting" and exports == [(SERIES, token)]
    results = cfg.node.resolved_results_dir() / SERIES
    assert sorted(p.name for p in results.iterdir()) == [
        "result.json",
        "sc.dcm",
        "seg.dcm",
        "sr.dcm",
    ]
    assert jobs.get(SERIES).state == JobState.EXPORTING
    # a re-run replaces the earlier results (idempotent), no temporary folders left
    token = jobs.mark_queued(SERIES)
    tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, token, stand_in(False, "2"))
    assert sorted(p.name for p in results.iterdir()) == ["result.json", "sc.dcm", "sr.dcm"]
    assert json.loads((results / "result.json").read_text()) == {"marker": "2"}
    assert [p.name for p in results.parent.iterdir()] == [SERIES]
    assert jobs.get(SERIES).note == tasks.L3_NOT_IN_FOV


def test_without_destinations_analysis_ends_done(tmp_path: Path, series_dir: Path) -> None:
    cfg = _config(tmp_path, destinations=False)
    jobs = JobStore(cfg.node.spool_dir)
    assert tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, None, stand_in()) == "done"
    assert jobs.get(SERIES).state == JobState.DONE


def test_stale_task_does_nothing(tmp_path: Path, series_dir: Path) -> None:
    cfg = _config(tmp_path)
    jobs = JobStore(cfg.node.spool_dir)
    old = jobs.mark_queued(SERIES, 30)
    jobs.mark_queued(SERIES)
    called: list[int] = []

    def pipeline(*a: Any) -> None:
        called.append(1)

    assert tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, old, pipeline) == "stale"
    assert called == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            SeriesValidationError(SERIES, "gantry tilt of 15.0 degrees"),
            "gantry tilt of 15.0 degrees",
        ),
        (RuntimeError("boom"), "internal error: RuntimeError: boom"),
        # a library message quoting a value (pydicom on a malformed PatientBirthDate): the
        # value never reaches the job record (issue 14, defect 4)
        (
            ValueError("Unable to convert '1950-01-02' to 'DA'"),
            "internal error: ValueError: Unable to convert '…' to '…'",
        ),
    ],
)
def test_pipeline_errors_end_in_a_failed_record(
    tmp_path: Path, series_dir: Path, error: Exception, reason: str
) -> None:
    cfg = _config(tmp_path)
    jobs = JobStore(cfg.node.spool_dir)

    def pipeline(*a: Any) -> None:
        raise error

    assert tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, None, pipeline) == "failed"
    rec = jobs.get(SERIES)
    assert rec.state == JobState.FAILED and rec.reason == reason
    assert not (cfg.node.resolved_results_dir() / SERIES).exists()


def test_export_retries_with_backoff_then_fails_with_remote_status(
    tmp_path: Path, series_dir: Path
) -> None:
    cfg = _config(tmp_path, attempts=3)
    jobs = JobStore(cfg.node.spool_dir)
    tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, None, stand_in())
    sent: list[list[str]] = []

    def refuse(files: list[Path], dest: Any, calling: str, timeout: float) -> ExportOutcome:
        sent.append([f.name for f in files])
        return ExportOutcome(False, "0xA700", "PACS@127.0.0.1:4242: C-STORE status 0xA700")

    assert tasks.run_export(SERIES, cfg, jobs, refuse) == ("retry", 1.0)
    assert tasks.run_export(SERIES, cfg, jobs, refuse) == ("retry", 2.0)
    assert tasks.run_export(SERIES, cfg, jobs, refuse) == ("failed", 0.0)
    rec = jobs.get(SERIES)
    assert rec.state == JobState.FAILED and "failed after 3 attempts" in (rec.reason or "")
    assert "export.max_attempts=3" in (rec.reason or "") and "status 0xA700" in (rec.reason or "")
    assert sent[0] == ["seg.dcm", "sr.dcm", "sc.dcm"]
    # l3spot retry: attempts reset, delivery succeeds
    jobs.start_export(SERIES, ["PACS@127.0.0.1:4242"])
    ok = tasks.run_export(SERIES, cfg, jobs, lambda *a: ExportOutcome(True))
    assert ok == ("done", 0.0) and jobs.get(SERIES).state == JobState.DONE


def test_heartbeats_keep_a_long_analysis_from_being_taken_over(
    tmp_path: Path, series_dir: Path
) -> None:
    cfg = _config(tmp_path)
    cfg.broker.heartbeat_seconds = 0.05
    jobs = JobStore(cfg.node.spool_dir)
    token = jobs.mark_queued(SERIES, 30)
    claimed: list[list[Any]] = []
    inner = stand_in()

    def slow(input_path: Path, out_dir: Path, config: Config) -> FakeResult:
        time.sleep(0.4)
        # the reconciliation, 0.4 s into the analysis, with a 0.2 s stale threshold
        claimed.append(jobs.claim_stale(0, time.time() - 0.2, 0))
        return inner(input_path, out_dir, config)

    assert tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, token, slow) == "exporting"
    assert claimed == [[]]
    assert jobs.get(SERIES).attempts == 1


def test_a_run_superseded_while_analysing_neither_finishes_nor_exports(
    tmp_path: Path, series_dir: Path
) -> None:
    cfg = _config(tmp_path)
    jobs = JobStore(cfg.node.spool_dir)
    token = jobs.mark_queued(SERIES, 30)
    inner = stand_in()

    def requeued_meanwhile(input_path: Path, out_dir: Path, config: Config) -> FakeResult:
        jobs.renew_token(SERIES)  # the node decided this run was lost and queued it again
        return inner(input_path, out_dir, config)

    exports: list[str] = []
    out = tasks.run_analysis(
        series_dir, cfg, jobs, lambda s, t: exports.append(s), token, requeued_meanwhile
    )
    assert out == "stale" and exports == []
    assert jobs.get(SERIES).state != JobState.EXPORTING


def test_a_series_that_kills_its_worker_every_time_is_failed_after_max_attempts(
    tmp_path: Path, series_dir: Path
) -> None:
    cfg = _config(tmp_path)
    cfg.analysis.max_attempts = 2
    jobs = JobStore(cfg.node.spool_dir)
    token = jobs.mark_queued(SERIES, 30)
    # two deliveries whose worker process died mid-analysis (started, never finished)
    for _ in range(2):
        assert jobs.start_analysis(SERIES, token)
    called: list[int] = []

    def pipeline(*a: Any) -> None:
        called.append(1)

    # the third delivery of the same task: not run again, a clear failure instead
    assert tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, token, pipeline) == "failed"
    rec = jobs.get(SERIES)
    assert called == [] and rec.state == JobState.FAILED
    assert "started 2 times without finishing" in (rec.reason or "")
    # an operator's retry queues it again with a fresh count, and it runs; the record's
    # total of attempts keeps the history
    token = jobs.mark_queued(SERIES)
    assert (jobs.get(SERIES).run_attempts, jobs.get(SERIES).attempts) == (0, 3)
    tasks.run_analysis(series_dir, cfg, jobs, lambda s, t: None, token, pipeline)
    assert called == [1] and (jobs.get(SERIES).run_attempts, jobs.get(SERIES).attempts) == (1, 4)


class Clock:
    """Simulated Unix time (s): run_export's attempts happen when the test says."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_default_policy_keeps_retrying_a_refused_pacs_for_hours(
    tmp_path: Path, series_dir: Path
) -> None:
    """Reproduction (issue 16): five attempts within 75 s, then ``failed``."""
    cfg = _config(tmp_path, attempts=None)  # the defaults (an old file's max_attempts: none)
    jobs = JobStore(cfg.node.spool_dir)
    _analysed(tmp_path, cfg, jobs)
    clock, start = Clock(), Clock().t
    attempts = 0
    while clock.t - start < 6 * 3600:  # a long maintenance window
        outcome, countdown = tasks.run_export(SERIES, cfg, jobs, refused, clock=clock)
        attempts += 1
        assert outcome == "retry" and 0 < countdown <= 900
        assert jobs.get(SERIES).state == JobState.EXPORTING  # never failed within the window
        clock.t += countdown
    assert attempts > 20
    rec = jobs.get(SERIES)
    assert rec.exports[0].state == ExportState.RETRYING and rec.exports[0].attempts == attempts
    assert rec.exports[0].first_failure_at == start
    # past export.retry_for_hours (24 h): failed, with the true reason
    clock.t = start + 24 * 3600
    assert tasks.run_export(SERIES, cfg, jobs, refused, clock=clock) == ("failed", 0.0)
    rec = jobs.get(SERIES)
    assert rec.state == JobState.FAILED
    assert f"export to {PACS} failed after {attempts + 1} attempts" in (rec.reason or "")
    assert "export.retry_for_hours=24" in (rec.reason or "")
    assert "connection refused by 127.0.0.1:4242" in (rec.reason or "")


def test_a_destination_answering_again_resends_the_series_waiting_for_it(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, attempts=None)
    jobs = JobStore(cfg.node.spool_dir)
    waiting = [f"{SERIES}.{i}" for i in range(3)]
    tokens = {uid: _analysed(tmp_path, cfg, jobs, uid) for uid in waiting}
    clock = Clock()
    # the PACS is down: each series fails a few times and waits its back-off (up to 900 s)
    for _ in range(6):
        for uid in waiting:
            assert tasks.run_export(uid, cfg, jobs, refused, clock=clock)[0] == "retry"
        clock.t += 60
    resent: list[tuple[str, str | None]] = []
    # the PACS is back; the first series whose retry comes up reaches it
    first, others = waiting[0], waiting[1:]
    out = tasks.run_export(
        first, cfg, jobs, accepted, resend=lambda s, t: resent.append((s, t)), clock=clock
    )
    assert out == ("done", 0.0)
    # the others are sent now, with new tokens: their pending countdowns become stale
    assert sorted(s for s, _ in resent) == others
    for uid, token in resent:
        assert token == jobs.get(uid).token and token != tokens[uid]
    for uid, _ in resent:
        assert tasks.run_export(uid, cfg, jobs, accepted, resend=resent.append) == ("done", 0.0)
    assert len(resent) == 2  # the destination was up: no second round
    assert all(jobs.get(uid).state == JobState.DONE for uid in waiting)


def test_a_series_refused_by_a_reachable_pacs_is_not_resent_by_others_successes(
    tmp_path: Path,
) -> None:
    """A C-STORE failure status of one series' objects is its own problem: no resend storm."""
    cfg = _config(tmp_path, attempts=None)
    jobs = JobStore(cfg.node.spool_dir)
    bad, good = f"{SERIES}.1", f"{SERIES}.2"
    _analysed(tmp_path, cfg, jobs, bad)
    _analysed(tmp_path, cfg, jobs, good)
    mismatch = ExportOutcome(
        False, "0xA900", f"{PACS}: C-STORE status 0xA900", kind=FailureKind.STORE_STATUS
    )
    assert tasks.run_export(bad, cfg, jobs, lambda *a: mismatch)[0] == "retry"
    resent: list[tuple[str, str | None]] = []
    assert tasks.run_export(good, cfg, jobs, accepted, resend=lambda s, t: resent.append((s, t)))
    assert resent == []
    assert jobs.destination_states([PACS])[0].state == DestinationState.OK


def test_destination_states_show_ok_retrying_down_and_the_waiting_series(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, attempts=None)
    jobs = JobStore(cfg.node.spool_dir)
    assert [(d.label, d.state) for d in jobs.destination_states([PACS])] == [
        (PACS, DestinationState.UNKNOWN)
    ]
    a, b = f"{SERIES}.1", f"{SERIES}.2"
    _analysed(tmp_path, cfg, jobs, a)
    _analysed(tmp_path, cfg, jobs, b)
    clock = Clock()
    tasks.run_export(a, cfg, jobs, accepted, clock=clock)
    (ok,) = jobs.destination_states([PACS])
    assert (ok.state, ok.last_ok_at, ok.waiting) == (DestinationState.OK, clock.t, 0)
    states = []
    for _ in range(3):
        clock.t += 10
        tasks.run_export(b, cfg, jobs, refused, clock=clock)
        states.append(jobs.destination_states([PACS])[0].state)
    assert states == [DestinationState.RETRYING, DestinationState.RETRYING, DestinationState.DOWN]
    (down,) = jobs.destination_states([PACS])
    assert down.waiting == 1 and down.consecutive_failures == 3
    assert down.last_attempt_at == clock.t and down.last_ok_at == clock.t - 30
    assert down.last_error == REFUSED.error
    assert json.loads(json.dumps(down.as_dict()))["state"] == "down"


def test_export_log_lines_carry_the_source_series_and_the_destination(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reproduction (issue 16): the line carried the SEG/SR's own Series Instance UID."""
    cfg = _config(tmp_path, attempts=None)
    jobs = JobStore(cfg.node.spool_dir)
    _analysed(tmp_path, cfg, jobs)
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        tasks.run_export(SERIES, cfg, jobs, refused)
    (line,) = [r for r in caplog.records if r.getMessage() == "export_attempt"]
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["series_instance_uid"] == SERIES and fields["destination"] == PACS
    assert fields["kind"] == "connection_refused" and fields["retry_in_s"] == 5.0
