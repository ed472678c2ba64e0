"""Job records follow a series through its states, survive restarts and reject stale tasks.

Every test runs on both back-ends (``backend``): SQLite in the spool, and a PostgreSQL
database of this test session (tests/support/postgres.py; skipped only when no server
answers on 127.0.0.1:5432).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from core.config import Config
from core.errors import ConfigError
from core.jobs import DB_NAME, jobs_database_label, mask_database_url
from service.jobs import (
    JobNotFoundError,
    JobState,
    JobStore,
    format_jobs,
)
from tests.support.postgres import empty_tables

SERIES = "1.2.826.0.1.3680043.8.498.1"


@dataclass
class Backend:
    """One job database: SQLite in ``spool`` (``url`` None) or the PostgreSQL ``url``."""

    spool: Path
    url: URL | None

    def store(self) -> JobStore:
        """A new store on this database (as a new process would open it)."""
        return JobStore(self.spool, database_url=self.url)

    def execute(self, sql: str) -> list[Any]:
        """Run ``sql`` on the database outside the store (an old schema, a raw look)."""
        url = self.url or f"sqlite:///{self.spool / DB_NAME}"
        engine = create_engine(url)
        try:
            with engine.begin() as con:
                result = con.execute(text(sql))
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(tmp_path, None)
    url = request.getfixturevalue("postgres_url")
    empty_tables(url)  # each test starts from an empty database
    return Backend(tmp_path, url)


def test_a_series_walks_through_every_state_with_timings(backend: Backend, tmp_path: Path) -> None:
    store = backend.store()
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


def test_records_survive_a_new_store_on_the_same_folder(backend: Backend, tmp_path: Path) -> None:
    backend.store().mark_ineligible(SERIES, "LOCALIZER series (scout image)", 2)
    rec = backend.store().get(SERIES)
    assert (rec.state, rec.reason, rec.n_instances) == (
        JobState.INELIGIBLE,
        "LOCALIZER series (scout image)",
        2,
    )


def test_stale_token_cannot_start_the_analysis(backend: Backend, tmp_path: Path) -> None:
    store = backend.store()
    old = store.mark_queued(SERIES, 30)
    new = store.mark_queued(SERIES)
    assert old != new
    assert not store.start_analysis(SERIES, old)
    assert store.get(SERIES).state == JobState.QUEUED
    assert store.start_analysis(SERIES, new)


def test_export_attempts_count_per_destination_and_fail_with_status(
    backend: Backend, tmp_path: Path
) -> None:
    store = backend.store()
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


def test_unknown_series_raises_with_its_uid(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(JobNotFoundError, match="9.9.9"):
        backend.store().get("9.9.9")


def test_list_filters_by_state_and_formats_reasons(backend: Backend, tmp_path: Path) -> None:
    store = backend.store()
    store.mark_received("1.1", "1", tmp_path)
    store.mark_ineligible("1.2", "3 slices, fewer than node.min_slices=20", 3)
    assert [r.series_uid for r in store.list((JobState.INELIGIBLE,))] == ["1.2"]
    assert len(store.list()) == 2
    text = format_jobs(store.list())
    assert "fewer than node.min_slices=20" in text and "received" in text


def test_claim_stale_takes_over_lost_tasks_with_new_tokens(
    backend: Backend, tmp_path: Path
) -> None:
    jobs = backend.store()
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


def test_a_repeated_delivery_after_the_work_is_done_does_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    jobs = backend.store()
    token = jobs.mark_queued("1.2.3", 30)
    assert jobs.start_analysis("1.2.3", token, worker="host/42")
    assert jobs.get("1.2.3").worker == "host/42"
    assert jobs.start_analysis("1.2.3", token)  # re-delivered while analysing: runs again
    assert jobs.finish_analysis("1.2.3", None, exporting=False, token=token)
    assert not jobs.start_analysis("1.2.3", token)  # re-delivered after done
    assert jobs.get("1.2.3").attempts == 2


def test_superseded_run_cannot_finish_or_heartbeat(backend: Backend, tmp_path: Path) -> None:
    jobs = backend.store()
    old = jobs.mark_queued("1.2.3", 30)
    assert jobs.start_analysis("1.2.3", old)
    new = jobs.renew_token("1.2.3")
    assert not jobs.heartbeat("1.2.3", old) and jobs.heartbeat("1.2.3", new)
    assert not jobs.finish_analysis("1.2.3", None, exporting=True, token=old)
    assert jobs.get("1.2.3").state == JobState.ANALYSING
    with pytest.raises(JobNotFoundError):
        jobs.renew_token("9.9.9")


def test_a_database_of_the_first_schema_gains_the_new_columns(
    backend: Backend, tmp_path: Path
) -> None:
    backend.execute(
        "CREATE TABLE jobs (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL DEFAULT '',"
        " series_dir TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT, note TEXT,"
        " n_instances INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
        " token TEXT, received_at REAL, completed_at REAL, queued_at REAL,"
        " analysis_started_at REAL, analysis_finished_at REAL, export_finished_at REAL,"
        " updated_at REAL NOT NULL)"
    )
    backend.execute(
        "INSERT INTO jobs (series_uid, state, updated_at) VALUES ('1.2.3', 'queued', 1)"
    )
    jobs = backend.store()
    rec = jobs.get("1.2.3")
    assert (rec.state, rec.requeues, rec.worker) == (JobState.QUEUED, 0, None)
    assert [r.series_uid for r in jobs.claim_stale(2, 2, 2)] == ["1.2.3"]


def test_job_states_are_stored_and_served_as_the_same_strings(
    backend: Backend, tmp_path: Path
) -> None:
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
    store = backend.store()
    store.mark_received(SERIES, "1.2.3", tmp_path / "s")
    store.start_export(SERIES, ["PACS@h:104"])
    typeof = "typeof(state)" if backend.url is None else "pg_typeof(state)::text"
    row = backend.execute(f"SELECT state, {typeof} FROM jobs")[0]
    export = backend.execute("SELECT state FROM exports")[0]
    assert row == ("exporting", "text") and export == ("pending",)
    rec = store.get(SERIES)
    assert rec.state is JobState.EXPORTING and rec.exports[0].state is ExportState.PENDING
    assert json.loads(json.dumps(rec.as_dict()))["state"] == "exporting"
    # a database written before the enum reads back as members
    backend.execute("UPDATE jobs SET state='done'")
    assert store.get(SERIES).state is JobState.DONE


def test_claim_waiting_exports_takes_only_series_still_waiting_to_be_sent(
    backend: Backend, tmp_path: Path
) -> None:
    jobs = backend.store()
    dest = "PACS@h:104"
    waiting, received_again, done, other_dest = (f"1.2.{i}" for i in range(4))
    for uid in (waiting, received_again, done, other_dest):
        jobs.mark_queued(uid, 30)
        jobs.start_export(uid, [dest if uid != other_dest else "OTHER@h:104"])
    for uid in (waiting, received_again, done):
        jobs.record_export_attempt(uid, dest, False, None, "refused", final=False)
    jobs.record_export_attempt(other_dest, "OTHER@h:104", False, None, "refused", final=False)
    jobs.record_export_attempt(done, dest, True, None, None, final=False)
    jobs.finish_export(done)
    # new instances arrived: a running analysis owns its token; no resend may take it
    jobs.mark_received(received_again, "", tmp_path)
    old = jobs.get(waiting).token
    claimed = jobs.claim_waiting_exports(dest)
    assert [uid for uid, _ in claimed] == [waiting]
    assert claimed[0][1] == jobs.get(waiting).token != old
    assert jobs.claim_waiting_exports(dest, exclude=waiting) == []


def test_an_exports_table_of_before_issue_16_gets_its_new_column(
    backend: Backend, tmp_path: Path
) -> None:
    backend.execute(
        "CREATE TABLE exports (series_uid TEXT NOT NULL, destination TEXT NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_status TEXT,"
        " last_error TEXT, updated_at REAL NOT NULL, PRIMARY KEY (series_uid, destination))"
    )
    backend.execute("INSERT INTO exports VALUES ('1.2.3', 'A@h:1', 'retrying', 2, NULL, 'x', 1)")
    jobs = backend.store()
    jobs.mark_queued("1.2.3", 30)
    assert jobs.get("1.2.3").exports[0].first_failure_at is None
    jobs.record_export_attempt("1.2.3", "A@h:1", False, None, "x", final=False, now=50.0)
    assert jobs.get("1.2.3").exports[0].first_failure_at == 50.0


# ---------------------------------------------------------------- several hosts (issue 18)


def _race(n: int, claims: list[Any]) -> list[Any]:
    """Run each of ``claims`` (callables) in its own thread, all released at one instant."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = claims[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_two_hosts_claiming_the_same_stale_jobs_never_both_win(postgres_url: URL) -> None:
    """Two nodes' reconciliations (each its own store and connection, as on two hosts) take
    over the same lost tasks at the same moment: each series is claimed exactly once, with
    one new token. Without the row locks (``FOR UPDATE``) both read the same stale rows under
    READ COMMITTED and both re-queue them."""
    empty_tables(postgres_url)
    setup = JobStore(Path("/tmp"), database_url=postgres_url)
    hosts = [JobStore(Path("/tmp"), database_url=postgres_url) for _ in range(2)]
    for rnd in range(5):
        uids = [f"1.2.{rnd}.{i}" for i in range(30)]
        for uid in uids:
            setup.mark_queued(uid, 30)
        cutoff = time.time() + 1e-3  # every record above is older; a claimed one is newer
        time.sleep(0.01)
        results = _race(2, [lambda h=h, c=cutoff: h.claim_stale(c, c, c) for h in hosts])
        a, b = ({r.series_uid for r in res} for res in results)
        assert a.isdisjoint(b), f"round {rnd}: claimed twice: {sorted(a & b)[:3]}"
        assert a | b == set(uids)
        assert all(setup.get(uid).requeues == 1 for uid in uids)
        for uid in uids:  # settled: not stale in the next round
            setup.finish_export(uid)


def test_a_destination_answering_again_is_announced_to_one_worker_only(
    postgres_url: URL,
) -> None:
    """Export workers on two hosts reach a destination that was down at the same moment:
    only one of them is told that it answers again (and resends the series waiting for it,
    :meth:`JobStore.claim_waiting_exports`); without the row lock both read the old failure
    count and both would resend everything."""
    empty_tables(postgres_url)
    hosts = [JobStore(Path("/tmp"), database_url=postgres_url) for _ in range(2)]
    for rnd in range(10):
        dest = f"PACS@h:{rnd}"
        for _ in range(3):
            hosts[0].record_destination_attempt(dest, reached=False, error="refused")
        results = _race(
            2, [lambda h=h, d=dest: h.record_destination_attempt(d, reached=True) for h in hosts]
        )
        assert sorted(results) == [False, True], f"round {rnd}: {results}"
        assert hosts[1].destination_states([dest])[0].consecutive_failures == 0


def test_the_postgresql_url_and_its_password_come_from_the_configuration(
    postgres_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``jobs.database_url`` picks PostgreSQL; the password comes from ``password_env`` or
    ``password_file`` and is masked wherever the URL is shown."""
    url = postgres_url.render_as_string(hide_password=False)
    monkeypatch.setenv("L3SPOT_TEST_DB_PASSWORD", "s3cret-pw")
    cfg = Config.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "jobs": {"database_url": url, "password_env": "L3SPOT_TEST_DB_PASSWORD"},
        }
    )
    empty_tables(postgres_url)
    store = JobStore.from_config(cfg)  # trust authentication: the password is not checked
    assert store.path is None and not (tmp_path / "spool" / DB_NAME).exists()
    store.mark_received(SERIES, "1.2.3", tmp_path)
    assert JobStore(tmp_path, database_url=postgres_url).get(SERIES).state == JobState.RECEIVED
    assert store.engine.url.password == "s3cret-pw"
    assert "s3cret-pw" not in store.label and "s3cret-pw" not in repr(store.engine)
    assert (
        mask_database_url("postgresql+psycopg://u:pw@db/l3") == "postgresql+psycopg://u:***@db/l3"
    )
    assert jobs_database_label(cfg) == url  # no password in the configured URL
    monkeypatch.delenv("L3SPOT_TEST_DB_PASSWORD")
    with pytest.raises(ConfigError, match="L3SPOT_TEST_DB_PASSWORD is not set"):
        JobStore.from_config(cfg)
    (tmp_path / "pw").write_text("from-file\n")
    cfg.jobs = cfg.jobs.model_copy(update={"password_env": None, "password_file": tmp_path / "pw"})
    assert JobStore.from_config(cfg).engine.url.password == "from-file"


def test_a_database_url_that_is_not_postgresql_is_refused_without_repeating_it(
    tmp_path: Path,
) -> None:
    from core.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(
            tmp_path / "none.yaml" if False else None,
            environ={"L3SPOT__JOBS__DATABASE_URL": "mysql://u:hunter2@db/l3"},
        )
    assert "jobs.database_url" in str(info.value) and "hunter2" not in str(info.value)
    assert jobs_database_label(Config()).startswith("sqlite:") and jobs_database_label(
        Config()
    ).endswith(DB_NAME)


def test_an_unreachable_database_stops_the_node_with_the_password_masked(tmp_path: Path) -> None:
    """``l3spot serve`` turns it into one ``startup_failed`` line (a StartupError), not a
    traceback, and the URL in it shows ``***`` for the password."""
    from core.errors import StartupError
    from service.node import Node

    cfg = Config.model_validate(
        {
            "node": {"spool_dir": str(tmp_path / "spool")},
            "jobs": {"database_url": "postgresql+psycopg://u:pw@127.0.0.1:1/x"},
        }
    )
    with pytest.raises(StartupError) as info:
        Node(cfg)
    assert "u:***@127.0.0.1:1/x" in str(info.value) and ":pw@" not in str(info.value)


def test_the_metrics_figures_are_read_from_either_database(
    backend: Backend, tmp_path: Path
) -> None:
    """``/metrics`` counts jobs, stage durations and deliveries through the store, so they
    are right on PostgreSQL too (they were read from the spool's SQLite file only: zeros)."""
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import NodeCollector

    pacs = "PACS@127.0.0.1:4242"
    store = backend.store()
    store.mark_received(SERIES, "1.2.3", tmp_path / "s")
    token = store.mark_queued(SERIES, n_instances=40)
    assert store.start_analysis(SERIES, token)
    store.finish_analysis(SERIES, note=None, exporting=True)
    store.start_export(SERIES, [pacs])
    store.record_export_attempt(SERIES, pacs, False, None, "refused", final=False)
    store.record_export_attempt(SERIES, pacs, True, "0x0000", None, final=False)
    store.finish_export(SERIES)
    store.mark_received(SERIES + ".2", "1.2.3", tmp_path / "s2")
    store.mark_queued(SERIES + ".2", n_instances=3)

    figures = store.figures()
    assert figures.states == {"done": 1, "queued": 1}
    assert {k: len(v) for k, v in figures.stage_seconds.items()} == {
        "queue_wait": 1,
        "analysis": 1,
        "export": 1,
    }
    assert all(v >= 0 for vs in figures.stage_seconds.values() for v in vs)
    assert figures.exports == {(pacs, "done"): 1}
    assert figures.export_failures == {pacs: 1}

    url = None if backend.url is None else backend.url.render_as_string(hide_password=False)
    config = Config.model_validate(
        {"node": {"spool_dir": str(backend.spool)}, "jobs": {"database_url": url}}
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(config))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
    }
    assert samples[("l3spot_jobs", (("state", "done"),))] == 1
    assert samples[("l3spot_jobs", (("state", "queued"),))] == 1
    assert samples[("l3spot_export_failures_total", (("destination", pacs),))] == 1
    assert samples[("l3spot_stage_duration_seconds_count", (("stage", "analysis"),))] == 1
