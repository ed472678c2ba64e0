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


def test_write_instance_fsyncs_file_and_folder(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    spool.write_instance(STUDY, SERIES, SOP, [b"x"])
    assert len(synced) == 2  # the file, then the folder holding the rename


@pytest.mark.parametrize("bad", ["", "../../etc", "1.2.a", "1..2", "1" * 65, "1.2/3"])
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

    monkeypatch.setattr(os, "fsync", no_space)
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
