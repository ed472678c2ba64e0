"""core.atomic: one rule for writing a file whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from core.atomic import temporary_name, write_atomically, write_npz_atomically


def test_the_new_content_replaces_the_old_and_no_temporary_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text("old")
    assert write_atomically(path, lambda p: p.write_text("new")) == path
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spine_fcn.pt"
    path.write_text("old")

    def half_then_fail(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["spine_fcn.pt"]


def test_the_temporary_name_is_hidden_per_process_and_never_matches_the_suffix() -> None:
    tmp = temporary_name(Path("/spool/out/seg.dcm"))
    assert tmp.parent == Path("/spool/out") and tmp.name.startswith(".")
    assert str(os.getpid()) in tmp.name and not tmp.name.endswith(".dcm")


def test_numpy_archives_are_written_through_an_open_file(tmp_path: Path) -> None:
    path = tmp_path / "case.npz"
    write_npz_atomically(path, {"image": np.arange(3)})
    assert np.load(path)["image"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.npz"]
