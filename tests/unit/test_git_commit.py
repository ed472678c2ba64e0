"""The commit a training or calibration record names (core/commands.py ``git_commit``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from core.commands import git_commit


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_record_made_from_a_changed_checkout_says_so(tmp_path: Path) -> None:
    """A record made with uncommitted changes named a commit that did not make it."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "rules.py").write_text("LIMIT = 1\n")
    _git(tmp_path, "add", "rules.py")
    _git(tmp_path, "commit", "-q", "-m", "rules")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked files do not make a result\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "rules.py").write_text("LIMIT = 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_outside_a_checkout_the_commit_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"
