"""Retention deletes old finished series by age and watermark, never unfinished work (issue 16)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.config import Config, RetentionConfig
from core.jobs import ExportRecord, ExportState, JobRecord, JobState, JobStore
from core.layout import series_results_dir
from l3spot import app
from service.audit import AuditLog
from service.retention import (
    DAY_S,
    GIB,
    RECENT_WRITE_GUARD_S,
    Entry,
    run_retention,
    select,
    start_retention,
)
from service.spool import SeriesBusyError, Spool

NOW = 1_800_000_000.0
MB = 1_000_000


def entry(uid: str, days_old: float, mb: float = 100, kind: str = "spool") -> Entry:
    t = NOW - days_old * DAY_S
    return Entry(kind, (Path(f"/x/{kind}/{uid}"),), int(mb * MB), t, t, uid, "1.2")  # type: ignore[arg-type]


def record(uid: str, state: JobState = JobState.DONE, *exports: ExportState) -> JobRecord:
    rec = JobRecord(uid, "1.2", "", state, updated_at=NOW - 400 * DAY_S)
    rec.exports = [ExportRecord(f"P{i}@h:{i + 1}", s) for i, s in enumerate(exports)]
    return rec


def deleted(sel) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"{d.entry.kind}:{d.entry.series_uid}" for d in sel.deletions]


# ------------------------------------------------------------------------- selection rules


def test_age_rule_deletes_only_what_is_older_than_its_kind_allows() -> None:
    cfg = RetentionConfig(min_free_disk_gb=None)
    entries = [
        entry("1.1", 40),
        entry("1.2", 10),
        entry("1.1", 40, kind="results"),
        entry("1.3", 400, kind="results"),
    ]
    records = {u: record(u, JobState.DONE, ExportState.DONE) for u in ("1.1", "1.2", "1.3")}
    sel = select(cfg, entries, records, NOW, free_bytes=None)
    assert deleted(sel) == ["results:1.3", "spool:1.1"]  # oldest first
    assert "older than retention.spool_max_age_days=30" in sel.deletions[1].why
    assert sel.need_bytes == 0


@pytest.mark.parametrize(
    ("state", "exports", "kept_because"),
    [
        (JobState.RECEIVED, (), "job received"),
        (JobState.QUEUED, (), "job queued"),
        (JobState.ANALYSING, (), "job analysing"),
        (JobState.EXPORTING, (ExportState.RETRYING,), "job exporting"),
        (JobState.DONE, (ExportState.DONE, ExportState.PENDING), "pending"),
        (JobState.FAILED, (ExportState.FAILED,), "export to P0@h:1 failed"),
    ],
)
def test_unfinished_or_unexported_series_are_never_deleted(
    state: JobState, exports: tuple[ExportState, ...], kept_because: str
) -> None:
    """Neither by age nor under a watermark that cannot be reached without them."""
    cfg = RetentionConfig(max_storage_gb=0.01, min_free_disk_gb=1000)
    entries = [entry("1.5", 900), entry("1.5", 900, kind="results")]
    sel = select(cfg, entries, {"1.5": record("1.5", state, *exports)}, NOW, free_bytes=0)
    assert sel.deletions == []
    assert all(kept_because in why for _, why in sel.kept) and len(sel.kept) == 2
    assert sel.need_bytes > 0  # the watermark is not reached: said, not forced


def test_ineligible_and_failed_without_exports_go_by_age_and_a_series_without_record_stays() -> (
    None
):
    cfg = RetentionConfig(min_free_disk_gb=None)
    entries = [entry("1.6", 31), entry("1.7", 31), entry("1.8", 900)]
    records = {"1.6": record("1.6", JobState.INELIGIBLE), "1.7": record("1.7", JobState.FAILED)}
    sel = select(cfg, entries, records, NOW, free_bytes=None)
    assert deleted(sel) == ["spool:1.6", "spool:1.7"]
    assert sel.kept == [(entries[2], "no job record")]


def test_watermark_deletes_the_oldest_spool_folders_first_down_to_the_low_watermark() -> None:
    """400 MB stored, limit 300 MB, low watermark 0.5 -> 250 MB must go: the three oldest
    CT folders (the results, small and valuable, only after every deletable CT)."""
    cfg = RetentionConfig(
        spool_max_age_days=None,
        results_max_age_days=None,
        max_storage_gb=300 * MB / GIB,
        low_watermark_fraction=0.5,
        min_free_disk_gb=None,
    )
    entries = [entry("1.4", 4), entry("1.1", 9), entry("1.3", 5), entry("1.2", 7)]
    entries.append(entry("1.1", 9, mb=1, kind="results"))
    records = {u: record(u, JobState.DONE, ExportState.DONE) for u in ("1.1", "1.2", "1.3", "1.4")}
    sel = select(cfg, entries, records, NOW, free_bytes=None)
    assert deleted(sel) == ["spool:1.1", "spool:1.2", "spool:1.3"]
    assert "above retention.max_storage_gb" in sel.deletions[0].why
    assert sel.need_bytes == 0


def test_low_free_disk_triggers_the_watermark_too() -> None:
    cfg = RetentionConfig(spool_max_age_days=None, min_free_disk_gb=1.0, low_watermark_fraction=0.8)
    entries = [entry("1.1", 3, mb=200), entry("1.2", 2, mb=200)]
    records = {u: record(u, JobState.DONE) for u in ("1.1", "1.2")}
    free = int(GIB - 100 * MB)  # 1 GiB / 0.8 wanted: 1.25 GiB - free = ~0.35 GiB -> both
    sel = select(cfg, entries, records, NOW, free_bytes=free)
    assert deleted(sel) == ["spool:1.1", "spool:1.2"]
    assert "below retention.min_free_disk_gb=1" in sel.deletions[0].why
    sel = select(cfg, entries, records, NOW, free_bytes=2 * GIB)
    assert sel.deletions == []


def test_series_being_received_or_written_recently_are_kept() -> None:
    cfg = RetentionConfig(min_free_disk_gb=None)
    recent = Entry("spool", (Path("/x"),), MB, NOW - 60, NOW - 60, "1.9", "1.2")
    entries = [entry("1.1", 40), recent]
    records = {u: record(u, JobState.DONE) for u in ("1.1", "1.9")}
    sel = select(cfg, entries, records, NOW, free_bytes=None, busy={"1.1"})
    assert sel.deletions == []
    assert [why for _, why in sel.kept] == [
        "series being received",
        f"written to in the last {RECENT_WRITE_GUARD_S / 3600:g} h",
    ]


# -------------------------------------------------------------------- on real folders


def _setup(tmp_path: Path, **retention: object) -> tuple[Config, JobStore, Spool]:
    cfg = Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "spool"},
            "retention": {"min_free_disk_gb": None, **retention},
        }
    )
    store = JobStore(cfg.node.spool_dir)
    spool = Spool(cfg.node.spool_dir, cfg.node.resolved_quarantine_dir(), fsync=False)
    return cfg, store, spool


def _series(
    cfg: Config, store: JobStore, spool: Spool, n: int, state: JobState, *exports: ExportState
) -> tuple[str, str, list[str]]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(n)]
    for sop in sops:
        spool.write_instance(study, series, sop, [b"\0" * 1000])
    store.mark_received(series, study, spool.series_dir(study, series))
    token = store.mark_queued(series, n)
    if state != JobState.QUEUED:
        store.start_analysis(series, token)
        dests = [f"P{i}@h:{i + 1}" for i in range(len(exports))]
        store.finish_analysis(series, None, exporting=bool(dests), token=token)
        if dests:
            store.start_export(series, dests)
            for d, s in zip(dests, exports, strict=True):
                store.record_export_attempt(
                    series, d, s == ExportState.DONE, None, None, final=s == ExportState.FAILED
                )
            if all(s == ExportState.DONE for s in exports):
                store.finish_export(series)
            else:
                store.mark_failed(series, "export failed")
    results = series_results_dir(cfg.node.resolved_results_dir(), series)
    results.mkdir(parents=True)
    (results / "sr.dcm").write_bytes(b"\0" * 500)
    return study, series, sops


def test_dry_run_deletes_nothing_and_a_run_deletes_marks_logs_and_audits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store, spool = _setup(tmp_path)
    study, done, sops = _series(cfg, store, spool, 3, JobState.DONE, ExportState.DONE)
    _, unexported, _ = _series(cfg, store, spool, 2, JobState.FAILED, ExportState.FAILED)
    _, queued, _ = _series(cfg, store, spool, 2, JobState.QUEUED)
    quarantined = spool.quarantine(b"junk", "malformed", {})
    audit = AuditLog(tmp_path / "audit.log")
    later = time.time() + 40 * DAY_S  # the CT passed 30 days, the results not 365

    dry = run_retention(cfg, store, spool, audit, dry_run=True, now=later)
    assert [(d.entry.kind, d.entry.series_uid) for d in dry.done] == [("spool", done)]
    assert dry.freed_bytes >= 3000 and audit.read() == []
    assert spool.series_dir(study, done).is_dir() and store.get(done).spool_purged_at is None

    with caplog.at_level("INFO", logger="service.retention"):
        report = run_retention(cfg, store, spool, audit, now=later + 60 * DAY_S)
    kinds = sorted((d.entry.kind, d.entry.series_uid) for d in report.done)
    assert kinds == [("quarantine", ""), ("spool", done)]  # 100 days: quarantine (90) too
    assert not spool.series_dir(study, done).exists() and not quarantined.exists()
    assert not spool.series_dir(study, done).parent.exists()  # its study folder was empty
    rec = store.get(done)
    assert rec.state == JobState.DONE and rec.spool_purged_at and rec.results_purged_at is None
    assert rec.purged == "spool"
    assert series_results_dir(cfg.node.resolved_results_dir(), done).is_dir()
    for kept in (unexported, queued):
        assert spool.series_folders(kept) and store.get(kept).spool_purged_at is None
    (audited,) = [a for a in audit.read() if a.get("purged") == "spool"]
    assert audited["series_instance_uid"] == done and audited["study_instance_uid"] == study
    assert audited["bytes_freed"] == 3000 and audited["event"] == "retention_deleted"
    (logged,) = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "retention_deleted" and r.fields["kind"] == "spool"  # type: ignore[attr-defined]
    ]
    assert logged["series_instance_uid"] == done and logged["study_instance_uid"] == study
    assert logged["bytes_freed"] == 3000 and "spool_max_age_days" in logged["reason"]

    report = run_retention(cfg, store, spool, audit, now=later + 400 * DAY_S)
    assert [d.entry.kind for d in report.done] == ["results"]
    assert store.get(done).purged == "spool+results"
    assert spool.sop_owner(sops[0]) is None


def test_jobs_list_says_purged(tmp_path: Path) -> None:
    from service.jobs import format_jobs

    cfg, store, spool = _setup(tmp_path)
    _, done, _ = _series(cfg, store, spool, 1, JobState.DONE)
    store.mark_purged(done, spool=True)
    before = store.get(done).updated_at
    assert "spool purged" in format_jobs(store.list())
    assert store.get(done).updated_at == before  # the age is not reset by the purge
    assert json.loads(json.dumps(store.get(done).as_dict()))["spool_purged_at"]


# ------------------------------------------------------------------------ the SOP index


def test_a_purged_instance_can_be_stored_again(tmp_path: Path) -> None:
    """The SCP's index (SOP UID -> its series) forgets purged instances: the same study sent
    again later is stored, not refused as a duplicate of a deleted file."""
    spool = Spool(tmp_path / "spool", tmp_path / "q", fsync=False)
    assert spool.build_sop_index() == 0
    spool.write_instance("1.2", "1.2.3", "1.2.3.4", [b"first"])
    assert spool.sop_owner("1.2.3.4") == ("1.2", "1.2.3")
    assert spool.remove_series("1.2", "1.2.3") == 5
    assert spool._sop_index == {}  # under its lock, not left for a lazy check
    assert (
        spool.sop_owner("1.2.3.4") is None
        and spool.existing_dataset("1.2", "1.2.3", "1.2.3.4") is None
    )
    path = spool.write_instance("1.2", "1.2.3", "1.2.3.4", [b"again"])
    assert path.read_bytes() == b"again" and spool.sop_owner("1.2.3.4") == ("1.2", "1.2.3")


def test_a_series_deleted_by_another_process_can_be_written_again(tmp_path: Path) -> None:
    """``l3spot retention`` runs in its own process: the node's spool still believes the
    folder exists (its cache of created folders); the next instance must be stored anyway."""
    node_spool = Spool(tmp_path / "spool", tmp_path / "q", fsync=False)
    cli_spool = Spool(tmp_path / "spool", tmp_path / "q", fsync=False)
    node_spool.write_instance("1.2", "1.2.3", "1.2.3.4", [b"x"])
    assert cli_spool.remove_series("1.2", "1.2.3") == 1
    node_spool.write_instance("1.2", "1.2.3", "1.2.3.5", [b"y"])
    assert sorted(p.name for p in node_spool.series_dir("1.2", "1.2.3").iterdir()) == [
        "1.2.3.5.dcm"
    ]


def test_a_series_being_written_is_not_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "q", fsync=False)
    spool.write_instance("1.2", "1.2.3", "1.2.3.4", [b"x"])
    spool._writing[spool.series_dir("1.2", "1.2.3")] = 1  # an association is writing now
    with pytest.raises(SeriesBusyError):
        spool.remove_series("1.2", "1.2.3")
    assert spool.series_dir("1.2", "1.2.3").is_dir()


# --------------------------------------------------------------- command and node thread


def test_retention_command_dry_run_and_run(tmp_path: Path) -> None:
    cfg, store, spool = _setup(tmp_path, spool_max_age_days=0.0001)
    study, done, _ = _series(cfg, store, spool, 2, JobState.DONE)
    old = time.time() - 2 * RECENT_WRITE_GUARD_S
    import os

    for p in [spool.series_dir(study, done), *spool.series_dir(study, done).iterdir()]:
        os.utime(p, (old, old))
    with sqlite3.connect(cfg.node.spool_dir / "jobs.sqlite") as con:  # last activity 2 h ago
        con.execute(
            "UPDATE jobs SET updated_at=?, received_at=?, completed_at=?, queued_at=?,"
            " analysis_finished_at=?, export_finished_at=?",
            (old,) * 6,
        )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    runner = CliRunner()
    result = runner.invoke(app, ["retention", "--dry-run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"would delete  spool       {study}/{done}" in result.output
    assert "older than retention.spool_max_age_days" in result.output
    assert "total: 1 would delete" in result.output
    assert spool.series_dir(study, done).is_dir()
    result = runner.invoke(app, ["retention", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "deleted" in result.output and not spool.series_dir(study, done).exists()
    assert store.get(done).purged == "spool"


def test_the_node_thread_runs_retention_every_interval(tmp_path: Path) -> None:
    cfg, store, spool = _setup(tmp_path, quarantine_max_age_days=1e-9, interval_minutes=0.002)
    q = spool.quarantine(b"junk", "malformed", {})
    assert (
        start_retention(
            cfg.model_copy(update={"retention": RetentionConfig(enabled=False)}),
            store,
            spool,
            None,
            set,
        )
        is None
    )
    thread = start_retention(cfg, store, spool, None, set)
    assert thread is not None
    try:
        deadline = time.monotonic() + 10
        while q.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread.stop()
    assert not q.exists()


def test_an_older_job_database_gets_the_purge_columns(tmp_path: Path) -> None:
    import sqlite3

    spool = tmp_path / "spool"
    spool.mkdir()
    con = sqlite3.connect(spool / "jobs.sqlite")
    con.execute(
        "CREATE TABLE jobs (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL DEFAULT '',"
        " series_dir TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT, note TEXT,"
        " n_instances INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
        " token TEXT, received_at REAL, completed_at REAL, queued_at REAL,"
        " analysis_started_at REAL, analysis_finished_at REAL, export_finished_at REAL,"
        " updated_at REAL NOT NULL)"
    )
    con.execute("INSERT INTO jobs (series_uid, state, updated_at) VALUES ('1.2', 'done', 1.0)")
    con.commit()
    con.close()
    store = JobStore(spool)
    assert store.get("1.2").purged is None
    store.mark_purged("1.2", spool=True, results=True, at=5.0)
    rec = store.get("1.2")
    assert (rec.spool_purged_at, rec.results_purged_at, rec.purged) == (5.0, 5.0, "spool+results")
