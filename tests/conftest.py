"""Shared fixtures: where the real data lives, and skips for missing external programs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worker.config import data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real CT data (``$L3SPOT_DATA`` or ``../shared/data``); skips if absent."""
    root = data_dir()
    if not root.is_dir():
        pytest.skip(f"real CT data not found at {root} (set L3SPOT_DATA)")
    return root


def require_program(name: str) -> str:
    """Path of an external program, or skip the test with the package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (see .ci/run)")
    return path
