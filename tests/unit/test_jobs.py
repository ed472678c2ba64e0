"""Job records follow a series through its states, survive restarts and reject stale tasks."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from core.jobs import DB_NAME
from service.jobs import (
    JobNotFoundError,
    JobState,
    JobStore,
    format_jobs,
)

SERIES = "1.2.826.0.1.3680043.8.498.1"


def test_a_series_walks_through_every_state_with_timings(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.mark_received(SERIES, "1.2.3", tmp_path / "s")
    assert store.get(SERIES).state == JobState.RECEIVED
    token = store.mark_queued(SERIES, n_instances=40)
    rec = store.get(SERIES)
    assert (rec.state, rec.n_instances, rec.token) == (JobState.QUEUED, 40, token)
    assert store.start_analysis(SERIES, token)
    store.finish_analysis(SERIES, note=None, exporting=True)
    store.start_export(SERIES, ["PACS@127.0.0.1:4242"])
    assert store.get(SERIES).state == JobState.EXPORTING
    store.record_export_attempt(SERIES, "PACS@127.0.0.1:4242", True, "0x0000", None, final=False)
    store.finish_export(SERIES)
    rec = store.get(SERIES)
    assert rec.state == JobState.DONE and rec.attempts == 1
    assert rec.exports[0].state == "done"
    assert set(rec.timings()) == {
        "queue_wait_s",
        "analysis_s",
        "export_s",
        "total_since_complete_s",
    }
    assert all(v >= 0 for v in rec.timings().values())


def test_records_survive_a_new_store_on_the_same_folder(tmp_path: Path) -> None:
    JobStore(tmp_path).mark_ineligible(SERIES, "LOCALIZER series (scout image)", 2)
    rec = JobStore(tmp_path).get(SERIES)
    assert (rec.state, rec.reason, rec.n_instances) == (
        JobState.INELIGIBLE,
        "LOCALIZER series (scout image)",
        2,
    )


def test_stale_token_cannot_start_the_analysis(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    old = store.mark_queued(SERIES, 30)
    new = store.mark_queued(SERIES)
    assert old != new
    assert not store.start_analysis(SERIES, old)
    assert store.get(SERIES).state == JobState.QUEUED
    assert store.start_analysis(SERIES, new)


def test_export_attempts_count_per_destination_and_fail_with_status(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.mark_queued(SERIES, 30)
    store.start_export(SERIES, ["A@h:1", "B@h:2"])
    assert store.record_export_attempt(SERIES, "A@h:1", False, "0xA700", "full", final=False) == 1
    assert store.record_export_attempt(SERIES, "A@h:1", False, "0xA700", "full", final=True) == 2
    store.mark_failed(SERIES, "export to A@h:1 failed after 2 attempts: status 0xA700")
    rec = store.get(SERIES)
    exports = {e.destination: e for e in rec.exports}
    assert exports["A@h:1"].state == "failed" and exports["A@h:1"].last_status == "0xA700"
    assert exports["B@h:2"].state == "pending"
    assert rec.state == JobState.FAILED and "0xA700" in (rec.reason or "")
    store.start_export(SERIES, ["A@h:1"])  # l3spot retry resets the attempts
    assert {e.destination: e.attempts for e in store.get(SERIES).exports}["A@h:1"] == 0


def test_destination_summary_has_last_success_last_failure_and_waiting(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    assert store.destination_summary() == {}
    a, b, c = (f"{SERIES}.{i}" for i in range(3))
    for uid in (a, b, c):
        store.mark_queued(uid, 30)
        store.start_export(uid, ["A@h:1", "B@h:2"])
    store.record_export_attempt(a, "A@h:1", False, None, "connection refused", final=False)
    store.record_export_attempt(a, "A@h:1", True, "0x0000", None, final=True)
    store.record_export_attempt(a, "B@h:2", True, "0x0000", None, final=True)
    time.sleep(0.01)  # distinct updated_at
    store.record_export_attempt(b, "A@h:1", False, "0xA700", "out of resources", final=False)
    time.sleep(0.01)
    store.record_export_attempt(c, "A@h:1", False, None, "association rejected", final=True)
    summary = store.destination_summary()
    sa, sb = summary["A@h:1"], summary["B@h:2"]
    assert sa.waiting == 1 and sa.failed == 1  # b retrying; c gave up; a delivered
    assert sa.last_error == "association rejected"  # the newest failure on record
    assert sa.last_success_at is not None and sa.last_failure_at is not None
    assert sa.last_failure_at >= sa.last_success_at
    assert sb.waiting == 2 and sb.failed == 0 and sb.last_failure_at is None
    assert sb.last_success_at == store.get(a).exports[1].updated_at


def test_unknown_series_raises_with_its_uid(tmp_path: Path) -> None:
    with pytest.raises(JobNotFoundError, match="9.9.9"):
        JobStore(tmp_path).get("9.9.9")


def test_list_filters_by_state_and_formats_reasons(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.mark_received("1.1", "1", tmp_path)
    store.mark_ineligible("1.2", "3 slices, fewer than node.min_slices=20", 3)
    assert [r.series_uid for r in store.list((JobState.INELIGIBLE,))] == ["1.2"]
    assert len(store.list()) == 2
    text = format_jobs(store.list())
    assert "fewer than node.min_slices=20" in text and "received" in text


def test_claim_stale_takes_over_lost_tasks_with_new_tokens(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    lost_queued, lost_running, alive, exporting, done = (f"1.2.{i}" for i in range(5))
    old = {uid: jobs.mark_queued(uid, 30) for uid in (lost_queued, lost_running, alive)}
    assert jobs.start_analysis(lost_running, old[lost_running])
    assert jobs.start_analysis(alive, old[alive])
    jobs.mark_queued(exporting, 30)
    jobs.start_export(exporting, ["PACS@h:1"])
    jobs.mark_queued(done, 30)
    jobs.finish_export(done)
    cutoff = time.time() + 1e-3  # everything above is older than this
    time.sleep(0.01)
    assert jobs.heartbeat(alive, old[alive])  # alive: its heartbeat is newer than the cutoff
    claimed = jobs.claim_stale(cutoff, cutoff, cutoff)
    by_uid = {r.series_uid: r for r in claimed}
    assert sorted(by_uid) == sorted([lost_queued, lost_running, exporting])
    assert (
        by_uid[lost_running].state == JobState.QUEUED
        and by_uid[exporting].state == JobState.EXPORTING
    )
    for uid in (lost_queued, lost_running):
        assert by_uid[uid].requeues == 1 and by_uid[uid].token != old[uid]
        assert not jobs.start_analysis(uid, old[uid])  # a late copy of the lost task
        assert jobs.start_analysis(uid, by_uid[uid].token)
    assert jobs.get(alive).state == JobState.ANALYSING and jobs.get(alive).requeues == 0
    assert jobs.claim_stale(0, 0, 0) == []  # just claimed: nothing is stale any more


def test_a_repeated_delivery_after_the_work_is_done_does_nothing(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    token = jobs.mark_queued("1.2.3", 30)
    assert jobs.start_analysis("1.2.3", token, worker="host/42")
    assert jobs.get("1.2.3").worker == "host/42"
    assert jobs.start_analysis("1.2.3", token)  # re-delivered while analysing: runs again
    assert jobs.finish_analysis("1.2.3", None, exporting=False, token=token)
    assert not jobs.start_analysis("1.2.3", token)  # re-delivered after done
    assert jobs.get("1.2.3").attempts == 2


def test_superseded_run_cannot_finish_or_heartbeat(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    old = jobs.mark_queued("1.2.3", 30)
    assert jobs.start_analysis("1.2.3", old)
    new = jobs.renew_token("1.2.3")
    assert not jobs.heartbeat("1.2.3", old) and jobs.heartbeat("1.2.3", new)
    assert not jobs.finish_analysis("1.2.3", None, exporting=True, token=old)
    assert jobs.get("1.2.3").state == JobState.ANALYSING
    with pytest.raises(JobNotFoundError):
        jobs.renew_token("9.9.9")


def test_a_database_of_the_first_schema_gains_the_new_columns(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        con.execute(
            "CREATE TABLE jobs (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL DEFAULT '',"
            " series_dir TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT, note TEXT,"
            " n_instances INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
            " token TEXT, received_at REAL, completed_at REAL, queued_at REAL,"
            " analysis_started_at REAL, analysis_finished_at REAL, export_finished_at REAL,"
            " updated_at REAL NOT NULL)"
        )
        con.execute(
            "INSERT INTO jobs (series_uid, state, updated_at) VALUES ('1.2.3', 'queued', 1)"
        )
    jobs = JobStore(tmp_path)
    rec = jobs.get("1.2.3")
    assert (rec.state, rec.requeues, rec.worker) == (JobState.QUEUED, 0, None)
    assert [r.series_uid for r in jobs.claim_stale(2, 2, 2)] == ["1.2.3"]


def test_job_states_are_stored_and_served_as_the_same_strings(tmp_path: Path) -> None:
    """JobState is a StrEnum: SQLite rows and JSON keep the strings of before (no migration)."""
    import json

    from core.jobs import PENDING_STATES, ExportState

    assert [str(s) for s in JobState] == [
        "received",
        "ineligible",
        "queued",
        "analysing",
        "exporting",
        "done",
        "failed",
    ]
    assert [s.value for s in ExportState] == ["pending", "retrying", "done", "failed"]
    assert {s for s in JobState if s.pending} == set(PENDING_STATES)
    store = JobStore(tmp_path)
    store.mark_received(SERIES, "1.2.3", tmp_path / "s")
    store.start_export(SERIES, ["PACS@h:104"])
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        row = con.execute("SELECT state, typeof(state) FROM jobs").fetchone()
        export = con.execute("SELECT state FROM exports").fetchone()
    assert row == ("exporting", "text") and export == ("pending",)
    rec = store.get(SERIES)
    assert rec.state is JobState.EXPORTING and rec.exports[0].state is ExportState.PENDING
    assert json.loads(json.dumps(rec.as_dict()))["state"] == "exporting"
    # a database written before the enum reads back as members
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        con.execute("UPDATE jobs SET state='done'")
    assert store.get(SERIES).state is JobState.DONE
