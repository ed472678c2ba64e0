"""Job records follow a series through its states, survive restarts and reject stale tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.jobs import (
    DONE,
    EXPORTING,
    FAILED,
    INELIGIBLE,
    QUEUED,
    RECEIVED,
    JobNotFoundError,
    JobStore,
    format_jobs,
)

SERIES = "1.2.826.0.1.3680043.8.498.1"


def test_a_series_walks_through_every_state_with_timings(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.mark_received(SERIES, "1.2.3", tmp_path / "s")
    assert store.get(SERIES).state == RECEIVED
    token = store.mark_queued(SERIES, n_instances=40)
    rec = store.get(SERIES)
    assert (rec.state, rec.n_instances, rec.token) == (QUEUED, 40, token)
    assert store.start_analysis(SERIES, token)
    store.finish_analysis(SERIES, note=None, exporting=True)
    store.start_export(SERIES, ["PACS@127.0.0.1:4242"])
    assert store.get(SERIES).state == EXPORTING
    store.record_export_attempt(SERIES, "PACS@127.0.0.1:4242", True, "0x0000", None, final=False)
    store.finish_export(SERIES)
    rec = store.get(SERIES)
    assert rec.state == DONE and rec.attempts == 1
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
        INELIGIBLE,
        "LOCALIZER series (scout image)",
        2,
    )


def test_stale_token_cannot_start_the_analysis(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    old = store.mark_queued(SERIES, 30)
    new = store.mark_queued(SERIES)
    assert old != new
    assert not store.start_analysis(SERIES, old)
    assert store.get(SERIES).state == QUEUED
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
    assert rec.state == FAILED and "0xA700" in (rec.reason or "")
    store.start_export(SERIES, ["A@h:1"])  # l3spot retry resets the attempts
    assert {e.destination: e.attempts for e in store.get(SERIES).exports}["A@h:1"] == 0


def test_unknown_series_raises_with_its_uid(tmp_path: Path) -> None:
    with pytest.raises(JobNotFoundError, match="9.9.9"):
        JobStore(tmp_path).get("9.9.9")


def test_list_filters_by_state_and_formats_reasons(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.mark_received("1.1", "1", tmp_path)
    store.mark_ineligible("1.2", "3 slices, fewer than node.min_slices=20", 3)
    assert [r.series_uid for r in store.list((INELIGIBLE,))] == ["1.2"]
    assert len(store.list()) == 2
    text = format_jobs(store.list())
    assert "fewer than node.min_slices=20" in text and "received" in text
