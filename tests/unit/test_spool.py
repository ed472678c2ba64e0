"""The spool writes instances durably and atomically, and quarantines what it cannot store."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from service.spool import Spool, SpoolWriteError, instance_files, is_valid_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", tmp_path / "quarantine")


def test_write_instance_puts_the_bytes_at_study_series_sop_path(spool: Spool) -> None:
    path = spool.write_instance(STUDY, SERIES, SOP, [b"abc", b"def"])
    assert path == spool.root / STUDY / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == b"abcdef"
    assert [p.name for p in path.parent.iterdir()] == [f"{SOP}.dcm"]  # no temporary left


def test_rewriting_an_instance_replaces_it(spool: Spool) -> None:
    spool.write_instance(STUDY, SERIES, SOP, [b"old"])
    path = spool.write_instance(STUDY, SERIES, SOP, [b"new!"])
    assert path.read_bytes() == b"new!"
    assert instance_files(path.parent) == [path]


def test_data_is_durable_before_the_rename_and_the_rename_before_returning(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops: list[str] = []
    real_fdatasync, real_fsync, real_replace = os.fdatasync, os.fsync, os.replace

    def fdatasync(fd: int) -> None:
        ops.append("fdatasync:file")
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        ops.append("fsync:" + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(a: object, b: object) -> None:
        ops.append("rename")
        real_replace(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    spool.write_instance(STUDY, SERIES, SOP, [b"x"])
    series_dir = str(spool.root / STUDY / SERIES)
    # new study and series folders: their parents are fsynced once, at creation
    assert ops[:2] == [f"fsync:{spool.root}", f"fsync:{spool.root / STUDY}"]
    assert ops[2:] == ["fdatasync:file", "rename", f"fsync:{series_dir}"]
    ops.clear()
    spool.write_instance(STUDY, SERIES, "1.2.3.4.6", [b"y"])
    assert ops == ["fdatasync:file", "rename", f"fsync:{series_dir}"]


def test_without_fsync_nothing_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = Spool(tmp_path / "s", tmp_path / "q", fsync=False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync called"))
    monkeypatch.setattr(os, "fdatasync", lambda fd: pytest.fail("fdatasync called"))
    assert fast.write_instance(STUDY, SERIES, SOP, [b"a", b"b"]).read_bytes() == b"ab"


def test_existing_dataset_returns_the_bytes_after_the_file_meta(spool: Spool) -> None:
    from service.scp import file_meta_bytes

    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", SOP, "1.2.840.10008.1.2.1", "SCANNER")
    assert spool.existing_dataset(STUDY, SERIES, SOP) is None
    spool.write_instance(STUDY, SERIES, SOP, [b"\x00" * 128, b"DICM", meta, b"DATASET!"])
    assert spool.existing_dataset(STUDY, SERIES, SOP) == b"DATASET!"


@pytest.mark.parametrize(
    "bad", ["", "../../etc", "1.2.a", "1..2", "1" * 65, "1.2/3", "1.2.3\n", "1.2.3\r\n", "\n1.2"]
)
def test_invalid_uids_never_become_paths(spool: Spool, bad: str) -> None:
    assert not is_valid_uid(bad)
    with pytest.raises(ValueError, match="invalid"):
        spool.write_instance(STUDY, bad, SOP, [b"x"])
    with pytest.raises(ValueError, match="invalid"):
        spool.write_instance(STUDY, SERIES, bad, [b"x"])
    assert not any(spool.root.rglob("*.dcm"))


def test_disk_error_raises_and_leaves_no_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", no_space)
    with pytest.raises(SpoolWriteError) as info:
        spool.write_instance(STUDY, SERIES, SOP, [b"x" * 100])
    assert info.value.errno == errno.ENOSPC
    assert list((spool.root / STUDY / SERIES).iterdir()) == []


def test_quarantine_keeps_bytes_and_reason(spool: Spool) -> None:
    path = spool.quarantine(b"garbage", "cannot parse", {"series_instance_uid": SERIES})
    assert path.read_bytes() == b"garbage"
    reason = json.loads(path.with_name(path.stem + ".reason.json").read_text())
    assert reason["reason"] == "cannot parse"
    assert reason["series_instance_uid"] == SERIES
    assert reason["bytes"] == 7


def test_iter_and_find_series(spool: Spool) -> None:
    spool.write_instance(STUDY, SERIES, SOP, [b"x"])
    spool.write_instance(STUDY, "1.2.3.9", SOP, [b"x"])
    (spool.root / "not-a-uid").mkdir()
    found = {ref.series_uid for ref in spool.iter_series()}
    assert found == {SERIES, "1.2.3.9"}
    ref = spool.find_series(SERIES)
    assert ref is not None and ref.study_uid == STUDY and ref.path.is_dir()
    assert spool.find_series("9.9") is None
