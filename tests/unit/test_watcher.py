"""The series watcher completes series by inactivity, filters them, and recovers after restarts."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.config import NodeConfig
from core.jobs import (
    JobNotFoundError,
    JobState,
    JobStore,
)
from service.eligibility import check_series
from service.spool import Spool
from service.watcher import SeriesWatcher
from tests.support.node import write_series


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[SeriesWatcher, Clock, list[tuple[Path, str, str]], NodeConfig]:
    node = NodeConfig(spool_dir=tmp_path / "spool", series_stable_seconds=5, min_slices=4)
    clock = Clock()
    queued: list[tuple[Path, str, str]] = []
    watcher = SeriesWatcher(
        node, JobStore(node.spool_dir), lambda d, s, t: queued.append((d, s, t)), clock
    )
    return watcher, clock, queued, node


def test_series_is_queued_once_after_its_stable_time(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    assert watcher.record_received() == 1  # the watcher thread's job, not the C-STORE's
    assert watcher.jobs.get(series).state == JobState.RECEIVED
    clock.t += 3
    watcher.touch(study, series, folder)  # a second association, 3 s later: timer restarts
    clock.t += 4
    assert watcher.poll() == []
    clock.t += 1.5
    assert watcher.poll() == [series]
    assert watcher.poll() == []
    assert queued == [(folder, series, watcher.jobs.get(series).token)]
    rec = watcher.jobs.get(series)
    assert (rec.state, rec.n_instances) == (JobState.QUEUED, 6)


def test_the_watcher_tells_the_scp_which_series_became_stable(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    stable: list[str] = []
    watcher.on_stable = stable.append
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    clock.t += 4
    watcher.poll()
    assert stable == []
    clock.t += 2
    watcher.poll()
    assert stable == [series] and len(queued) == 1


def test_too_short_series_gets_an_ineligible_record(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    study, series, folder = write_series(tmp_path / "spool" / "s", 2)
    watcher.touch(study, series, folder)
    clock.t += 10
    watcher.poll()
    rec = watcher.jobs.get(series)
    assert rec.state == JobState.INELIGIBLE and "fewer than node.min_slices=4" in (rec.reason or "")
    assert queued == []


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"modality": "MR"}, "no CT Image Storage"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "LOCALIZER"),
        ({"orientation": (0, 1, 0, 0, 0, -1)}, "not an axial"),
    ],
)
def test_eligibility_rules_give_reasons(tmp_path: Path, kwargs: dict, reason: str) -> None:
    _, _, folder = write_series(tmp_path / "s", 5, **kwargs)
    verdict = check_series(folder, NodeConfig(min_slices=4))
    assert not verdict.eligible and reason in verdict.reason
    assert verdict.n_instances == 5


@pytest.mark.parametrize(
    ("degrees", "along_normal", "error"),
    [
        (7.0, True, "oblique slices 7.0 degrees from axial (limit 5"),
        (7.0, False, "gantry tilt of 7.0 degrees"),
        (3.0, False, "gantry tilt of 3.0 degrees"),
    ],
)
def test_eligibility_refuses_what_the_loader_refuses_with_the_same_reason(
    tmp_path: Path, degrees: float, along_normal: bool, error: str
) -> None:
    """One rule (core.series_rules): a series tilted 7 degrees from axial used to be queued
    (eligibility allowed 10 degrees) and then failed in the worker (the loader allows 5)."""
    import numpy as np
    import pydicom

    from worker.volume.load import SeriesValidationError, load_series

    a = np.radians(degrees)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), -float(np.sin(a)))
    _, _, folder = write_series(tmp_path / "s", 6, orientation=orientation)
    if along_normal:  # an oblique stack: positions step along the slice normal
        normal = np.cross(orientation[:3], orientation[3:])
        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = [float(v) for v in normal * 2.0 * (ds.InstanceNumber - 1)]
            ds.save_as(f)
    verdict = check_series(folder, NodeConfig(min_slices=4))
    with pytest.raises(SeriesValidationError) as loaded:
        load_series(folder, min_slices=4)
    assert not verdict.eligible
    assert verdict.reason == loaded.value.reason
    assert error in verdict.reason


def test_series_description_regex(tmp_path: Path) -> None:
    _, _, folder = write_series(tmp_path / "s", 5, description="THORAX 1mm")
    assert not check_series(
        folder, NodeConfig(min_slices=4, series_description_regex="(?i)abdo")
    ).eligible
    assert check_series(
        folder, NodeConfig(min_slices=4, series_description_regex="(?i)thorax")
    ).eligible


def test_recover_requeues_pending_and_restarts_timers(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    spool = Spool(node.spool_dir, tmp_path / "q")
    jobs = watcher.jobs
    s_queued = write_series(spool.root / "1.1" / "1.1.1", 5)[1]
    s_new = write_series(spool.root / "1.1" / "1.1.2", 5)[1]
    s_done = write_series(spool.root / "1.1" / "1.1.3", 5)[1]
    s_export = write_series(spool.root / "1.1" / "1.1.4", 5)[1]
    del s_queued, s_new, s_done, s_export  # folder names are what the spool knows
    jobs.mark_queued("1.1.1", 5)
    jobs.mark_queued("1.1.3", 5)
    jobs.finish_export("1.1.3")
    assert jobs.get("1.1.3").state == JobState.DONE
    jobs.mark_queued("1.1.4", 5)
    jobs.start_export("1.1.4", ["P@h:1"])
    exports: list[str] = []
    actions = watcher.recover(spool, lambda s, t: exports.append(s))
    assert actions == {"1.1.1": "requeued", "1.1.2": "timer", "1.1.4": "export_requeued"}
    assert [q[1] for q in queued] == ["1.1.1"] and exports == ["1.1.4"]
    assert "1.1.2" in watcher.pending


def test_a_failed_publish_leaves_the_series_queued_for_the_reconciliation(
    tmp_path: Path,
) -> None:
    node = NodeConfig(spool_dir=tmp_path / "spool", series_stable_seconds=0, min_slices=4)

    def broker_down(d: Path, s: str, t: str) -> None:
        raise ConnectionRefusedError("redis down")

    watcher = SeriesWatcher(node, JobStore(node.spool_dir), broker_down)
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    assert watcher.poll() == [series]
    rec = watcher.jobs.get(series)
    assert rec.state == JobState.QUEUED and rec.token and rec.reason is None


def test_recover_leaves_running_series_of_separate_workers_alone(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    spool = Spool(node.spool_dir, tmp_path / "q")
    write_series(spool.root / "1.1" / "1.1.1", 5)
    token = watcher.jobs.mark_queued("1.1.1", 5)
    assert watcher.jobs.start_analysis("1.1.1", token)
    # Redis, separate workers: one may still be running it; the reconciliation decides
    assert watcher.recover(spool, lambda s, t: None, requeue_running=False) == {}
    assert queued == [] and watcher.jobs.get("1.1.1").token == token
    # the node's own workers died with it: queued again at once, with a new token
    assert watcher.recover(spool, lambda s, t: None) == {"1.1.1": "requeued"}
    assert len(queued) == 1 and queued[0][2] == watcher.jobs.get("1.1.1").token != token


def test_node_reconciliation_requeues_lost_tasks_and_survives_a_broker_outage(
    tmp_path: Path,
) -> None:
    from core.config import Config
    from service.node import Node

    cfg = Config.model_validate(
        {
            "node": {"spool_dir": tmp_path / "spool"},
            "broker": {"stale_queued_seconds": 60, "stale_running_seconds": 10},
            "export": {"backoff_max_seconds": 5, "timeout_seconds": 5},
        }
    )
    node = Node(cfg)
    study, series, folder = write_series(tmp_path / "spool" / "1.9" / "1.9.1", 5)
    del study, series
    jobs = node.jobs
    jobs.mark_received("1.9.1", "1.9", folder)
    token = jobs.mark_queued("1.9.1", 5)
    assert jobs.start_analysis("1.9.1", token)
    jobs.mark_queued("1.9.2", 5)  # queued, but its folder is gone from the spool
    sent: list[tuple[str, str]] = []
    node.enqueue_analysis = lambda d, s, t: sent.append((s, t))  # type: ignore[method-assign]
    now = time.time()
    assert node.reconcile(now + 5) == []  # analysing, heartbeat 5 s old: alive
    claimed = node.reconcile(now + 11)
    assert [r.series_uid for r in claimed] == ["1.9.1"]
    assert sent == [("1.9.1", jobs.get("1.9.1").token)] and sent[0][1] != token
    assert jobs.get("1.9.1").state == JobState.QUEUED

    # 70 s later the queued one's message is presumed lost too; the broker is down now
    def down(d: Path, s: str, t: str) -> None:
        raise ConnectionError("broker down")

    node.enqueue_analysis = down  # type: ignore[method-assign]
    claimed = node.reconcile(time.time() + 70)
    assert sorted(r.series_uid for r in claimed) == ["1.9.1", "1.9.2"]
    assert jobs.get("1.9.2").state == JobState.FAILED and "not in the spool" in (
        jobs.get("1.9.2").reason or ""
    )
    assert (
        jobs.get("1.9.1").state == JobState.QUEUED
    )  # still pending: claimed again after the delay


@contextmanager
def db_write_locked(db: Path) -> Iterator[None]:
    """Hold the job database's write lock from another connection (a busy worker)."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        con.execute("COMMIT")
        con.close()


def test_touch_never_waits_for_a_locked_job_database(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 7: ``touch`` runs inside the C-STORE handler; it must not wait for SQLite.

    Before the fix the first instance of a series wrote its ``received`` record from the
    association thread and waited up to 30 s (the job store's busy timeout, also the
    scanners' DIMSE timeout) for the write lock.
    """
    watcher, clock, queued, node = setup
    watcher.jobs.busy_timeout_s = 0.3  # a failed attempt costs 0.3 s, not 30 (test speed)
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    with db_write_locked(watcher.jobs.path):
        t0 = time.perf_counter()
        for _ in range(3):
            watcher.touch(study, series, folder)
        assert time.perf_counter() - t0 < 0.5
        assert series in watcher.pending
        clock.t += 10  # stable, but its received record could not be written yet:
        t1 = time.perf_counter()
        assert watcher.poll() == []  # not completed (received must not land after queued)
        assert time.perf_counter() - t1 < 5, "the store ignored its busy_timeout_s"
    with pytest.raises(JobNotFoundError):
        watcher.jobs.get(series)
    assert watcher.poll() == [series]  # lock released: received, then queued, in order
    rec = watcher.jobs.get(series)
    assert rec.state == JobState.QUEUED and rec.received_at is not None
    assert queued == [(folder, series, rec.token)]


def test_watcher_thread_records_received_promptly_and_at_stop(tmp_path: Path) -> None:
    node = NodeConfig(
        spool_dir=tmp_path / "spool",
        series_stable_seconds=60,
        watcher_interval_seconds=30,  # the wake-up, not the interval, must write the record
        min_slices=4,
    )
    jobs = JobStore(node.spool_dir)
    watcher = SeriesWatcher(node, jobs, lambda d, s, t: None)
    study, series, folder = write_series(tmp_path / "spool" / "s", 5)
    watcher.start()
    try:
        before = time.time()
        watcher.touch(study, series, folder)
        rec = wait_record(jobs, series, 5.0)
        assert rec.state == JobState.RECEIVED and before <= (rec.received_at or 0) <= time.time()
        late = write_series(tmp_path / "spool" / "t", 5)
        with db_write_locked(jobs.path):  # the thread waits on SQLite; touch does not
            t0 = time.perf_counter()
            watcher.touch(*late)
            assert time.perf_counter() - t0 < 0.5
    finally:
        stopper = threading.Thread(target=watcher.stop)
        stopper.start()
        stopper.join(60)
    assert jobs.get(late[1]).state == JobState.RECEIVED  # written once the lock was free


def wait_record(jobs: JobStore, series_uid: str, timeout_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return jobs.get(series_uid)
        except JobNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_background_calls_never_make_the_caller_wait_and_run_in_order() -> None:
    """The web page's sender record runs here, off the association thread (issue 7)."""
    from service.node import BackgroundCalls

    release = threading.Event()
    done: list[int] = []

    def slow(i: int) -> None:
        release.wait(10)  # a locked web.sqlite
        done.append(i)

    def boom() -> None:
        raise sqlite3.OperationalError("database is locked")

    calls = BackgroundCalls("test-calls")
    deferred = calls.wrap(slow)
    t0 = time.perf_counter()
    deferred(1)
    calls.submit(boom)  # logged and dropped; the thread goes on
    deferred(2)
    assert time.perf_counter() - t0 < 0.5 and done == []
    release.set()
    calls.join()
    assert done == [1, 2]


# ------------------------------------------------- one Series UID, one study (issue 14, defect 3)


def _spool_series(node: NodeConfig, study: str, series: str, n: int, start: int = 0) -> Path:
    """``n`` slices of ``series`` filed under ``study`` in the spool, as the SCP lays them."""
    from tests.support.node import make_ct

    folder = node.spool_dir / study / series
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        ds = make_ct(study, series, i)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def _quarantined(node: NodeConfig) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in node.resolved_quarantine_dir().glob("*.json")]


def test_a_stray_slice_filed_first_under_another_study_does_not_block_the_series(setup) -> None:  # type: ignore[no-untyped-def]
    """Reproduction: one stray slice of series S under study X made the job "ineligible:
    1 slice" and the real slices under study Y were never analysed."""
    from pydicom.uid import generate_uid

    watcher, clock, queued, node = setup
    series, stray_study, study = generate_uid(), generate_uid(), generate_uid()
    stray = _spool_series(node, stray_study, series, 1)
    watcher.touch(stray_study, series, stray)
    clock.t += 6
    watcher.poll()
    assert watcher.jobs.get(series).state == JobState.INELIGIBLE
    real = _spool_series(node, study, series, 6, start=10)
    for _ in range(6):
        watcher.touch(study, series, real)
    clock.t += 6
    assert watcher.poll() == [series]
    rec = watcher.jobs.get(series)
    assert (rec.state, rec.study_uid, rec.n_instances) == (JobState.QUEUED, study, 6)
    assert queued[-1][0] == real
    assert not stray.exists() and not stray.parent.exists()  # moved with its reason, not deleted
    (reason,) = _quarantined(node)
    assert reason["instances"] == 1 and reason["study_instance_uid"] == stray_study
    assert f"already belongs to study {study}" in reason["reason"]


def test_a_stray_slice_in_the_same_burst_goes_to_quarantine(setup) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import generate_uid

    watcher, clock, queued, node = setup
    series, stray_study, study = generate_uid(), generate_uid(), generate_uid()
    stray = _spool_series(node, stray_study, series, 1)
    watcher.touch(stray_study, series, stray)  # the stray comes first
    real = _spool_series(node, study, series, 5, start=10)
    watcher.touch(study, series, real)
    watcher.record_received()
    clock.t += 6
    watcher.poll()
    rec = watcher.jobs.get(series)
    assert (rec.state, rec.study_uid, rec.n_instances) == (JobState.QUEUED, study, 5)
    assert not stray.exists() and len(_quarantined(node)) == 1


def test_a_stray_instance_under_another_study_never_changes_a_finished_job(setup) -> None:  # type: ignore[no-untyped-def]
    """Reproduction: one slice of a done series sent under another Study UID overwrote the
    job's state."""
    from pydicom.uid import generate_uid

    watcher, clock, queued, node = setup
    series, study, other = generate_uid(), generate_uid(), generate_uid()
    real = _spool_series(node, study, series, 6)
    watcher.touch(study, series, real)
    clock.t += 6
    watcher.poll()
    token = watcher.jobs.get(series).token
    watcher.jobs.start_analysis(series, token)
    watcher.jobs.finish_analysis(series, None, exporting=False, token=token)
    before = watcher.jobs.get(series)
    assert before.state == JobState.DONE
    stray = _spool_series(node, other, series, 1, start=50)
    watcher.touch(other, series, stray)
    watcher.record_received()
    assert watcher.jobs.get(series).state == JobState.DONE  # not reset to received
    clock.t += 6
    watcher.poll()
    after = watcher.jobs.get(series)
    assert (after.state, after.study_uid, after.series_dir) == (
        JobState.DONE,
        study,
        before.series_dir,
    )
    assert len(queued) == 1 and not stray.exists() and real.is_dir()
    assert _quarantined(node)[0]["study_instance_uid"] == other


# ---------------------------------------------------------------- disk full (issue 16)


class DiskFull:
    """Every write of a :class:`JobStore` fails while ``full`` (the spool's disk is full)."""

    def __init__(self, jobs: JobStore, error: Exception) -> None:
        self.full = False
        self.failures = 0
        real = jobs._write

        @contextmanager
        def write() -> Iterator[sqlite3.Connection]:
            if self.full:
                self.failures += 1
                raise error
            with real() as con:
                yield con

        jobs._write = write  # type: ignore[method-assign]


def _tick(watcher: SeriesWatcher) -> None:
    """One turn of the watcher thread (:meth:`SeriesWatcher._run`): an error is survived."""
    import contextlib

    with contextlib.suppress(Exception):
        watcher.poll()


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("database or disk is full"),
        OSError(28, "No space left on device"),
    ],
    ids=["sqlite_full", "enospc"],
)
def test_a_series_completed_while_the_disk_is_full_is_queued_once_space_returns(
    setup, tmp_path: Path, error: Exception
) -> None:  # type: ignore[no-untyped-def]
    """Reproduction (issue 16): the watcher dropped the series from its table before the
    ``queued`` write failed; after space returned it stayed ``received`` forever, no new
    C-STORE came to wake it, and nothing said so."""
    watcher, clock, queued, node = setup
    disk = DiskFull(watcher.jobs, error)
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    assert watcher.record_received() == 1
    disk.full = True
    clock.t += 10  # stable while the disk is full: every attempt fails
    for _ in range(20):
        _tick(watcher)
        clock.t += 1
    assert disk.failures >= 1 and queued == []
    assert watcher.jobs.get(series).state == JobState.RECEIVED
    disk.full = False  # space returned; no instance arrives
    clock.t += 120  # at most the longest back-off
    _tick(watcher)
    rec = watcher.jobs.get(series)
    assert rec.state == JobState.QUEUED and rec.n_instances == 6
    assert queued == [(folder, series, rec.token)]
    _tick(watcher)
    assert len(queued) == 1


def test_a_storage_failure_is_logged_once_a_minute_and_shown_to_health(
    setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """While the disk stays full the watcher retries every tick (after a back-off) but
    logs one warning per minute, not one per tick; :meth:`SeriesWatcher.health` tells the
    web page's health check what failed and which series wait."""
    watcher, clock, queued, node = setup
    disk = DiskFull(watcher.jobs, sqlite3.OperationalError("database or disk is full"))
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    watcher.record_received()
    assert watcher.health().ok and watcher.health().last_error is None
    disk.full = True
    clock.t += 10
    with caplog.at_level("WARNING", logger="service.watcher"):
        for _ in range(300):  # five minutes of one-second ticks
            _tick(watcher)
            clock.t += 1
    warnings = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert 2 <= len(warnings) <= 6, [r.getMessage() for r in warnings]
    assert disk.failures >= 5  # it kept trying (with back-off)
    health = watcher.health()
    assert not health.ok and "database or disk is full" in (health.last_error or "")
    assert health.waiting == [series] and health.last_error_at is not None
    disk.full = False
    clock.t += 120
    with caplog.at_level("INFO", logger="service.watcher"):
        _tick(watcher)
    assert any("watcher_storage_recovered" in r.getMessage() for r in caplog.records)
    health = watcher.health()
    assert health.ok and health.waiting == [] and watcher.jobs.get(series).state == "queued"
    assert "database or disk is full" in (health.last_error or "")  # kept for the operator


def test_an_ineligible_verdict_that_cannot_be_written_is_written_later(
    setup, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    watcher, clock, queued, node = setup
    disk = DiskFull(watcher.jobs, sqlite3.OperationalError("database or disk is full"))
    study, series, folder = write_series(tmp_path / "spool" / "s", 2)
    watcher.touch(study, series, folder)
    watcher.record_received()
    disk.full = True
    clock.t += 10
    _tick(watcher)
    disk.full = False
    clock.t += 120
    _tick(watcher)
    assert watcher.jobs.get(series).state == JobState.INELIGIBLE


def test_a_failed_publish_is_sent_again_on_a_later_tick_with_the_same_token(
    setup, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The enqueue step: the record says ``queued`` but the broker refused the message; the
    watcher re-sends it itself (not 15 minutes later by the reconciliation)."""
    watcher, clock, queued, node = setup
    down = {"on": True}

    def enqueue(d: Path, s: str, t: str) -> None:
        if down["on"]:
            raise ConnectionRefusedError("broker down")
        queued.append((d, s, t))

    watcher.enqueue = enqueue
    study, series, folder = write_series(tmp_path / "spool" / "s", 6)
    watcher.touch(study, series, folder)
    clock.t += 10
    assert watcher.poll() == [series]
    token = watcher.jobs.get(series).token
    assert watcher.jobs.get(series).state == JobState.QUEUED and queued == []
    assert series in watcher.health().waiting
    down["on"] = False
    clock.t += 120
    watcher.poll()
    assert queued == [(folder, series, token)] and watcher.jobs.get(series).token == token
    watcher.poll()
    assert len(queued) == 1 and watcher.health().ok


def test_a_received_series_the_watcher_lost_is_picked_up_by_the_reconciliation(
    tmp_path: Path,
) -> None:
    """A ``received`` record with no watcher entry (a node that lost it, e.g. before this
    fix) is adopted by the node's periodic reconciliation: its timer restarts and it is
    queued, without any new C-STORE and without a restart."""
    from core.config import Config
    from service.node import Node

    cfg = Config.model_validate(
        {"node": {"spool_dir": tmp_path / "spool", "series_stable_seconds": 0, "min_slices": 4}}
    )
    node = Node(cfg)
    sent: list[str] = []
    node.enqueue_analysis = lambda d, s, t: sent.append(s)  # type: ignore[method-assign]
    node.watcher.enqueue = node.enqueue_analysis
    study, series, folder = write_series(tmp_path / "spool" / "1.7" / "1.7.1", 5)
    node.jobs.mark_received(series, study, folder, received_at=time.time() - 3600)
    lost_elsewhere = "1.7.9"
    node.jobs.mark_received(
        lost_elsewhere, "1.7", tmp_path / "gone", received_at=time.time() - 3600
    )
    assert node.watcher.pending == {}
    node.reconcile(time.time() + 3600)
    node.watcher.poll()
    assert sent == [series] and node.jobs.get(series).state == JobState.QUEUED
    assert node.jobs.get(lost_elsewhere).state == JobState.FAILED
    assert "not in the spool" in (node.jobs.get(lost_elsewhere).reason or "")
