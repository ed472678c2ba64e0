"""Shared fixtures: where the real data lives, and skips for missing external programs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.config import data_dir

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


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


def require_shipped(path: Path | None, what: str = "weights") -> Path:
    """A file committed under ``models/``, or fail the test (never skip) with what is missing.

    A shipped weights file that cannot be found is a broken checkout or a broken path, not an
    optional dependency: it must show up red, not as a skip.
    """
    if path is None or not Path(path).is_file():
        pytest.fail(
            f"shipped {what} missing: {path} (committed under models/; a broken checkout or a "
            "wrong path in core/config.py)",
            pytrace=False,
        )
    return Path(path)


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory):
    """A small phantom abdomen-pelvis DICOM series with known L3 (written once per session).

    Returns ``(series_dir, phantom)``: ``series_dir`` holds the CT files (128 x 128 px,
    3 mm pixels, 5 mm slices, seed 11); ``phantom`` is the :class:`worker.phantom.Phantom`
    with ``truth`` (L3 z range, mid-L3 slice index) and ``labels`` (z, y, x).
    """
    from worker.phantom import PhantomSpec, generate_phantom, write_phantom

    spec = PhantomSpec(
        fov="abdomen_pelvis", rows=128, cols=128, pixel_spacing_mm=3.0, slice_thickness_mm=5.0
    )
    ph = generate_phantom(11, spec)
    series_dir = write_phantom(ph, tmp_path_factory.mktemp("phantom_series"), fmt="dicom")
    return series_dir, ph


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under ``tests/integration/`` carries the ``integration`` marker."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """A fresh PostgreSQL database for this test session (``l3spot_test_<random>``, dropped
    afterwards) on the server of ``$L3SPOT_TEST_PG_URL`` (default 127.0.0.1:5432, which
    ``.ci/run`` starts); skips when no server answers there."""
    from tests.support.postgres import ADMIN_URL, scratch_database, server_answers

    if not server_answers():
        pytest.skip(f"no PostgreSQL server answers at {ADMIN_URL} (.ci/run starts one)")
    with scratch_database() as url:
        yield url


@pytest.fixture()
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Locator -> slice ``L3_INDEX`` of :mod:`tests.support.outputs` (or not in the field of
    view when the returned dict's ``in_fov`` is set False); composition -> fabricated. The
    pipeline runs without a model."""
    import worker.pipeline as pipeline
    from tests.support.outputs import L3_INDEX, fabricated_composition, fabricated_location

    state = {"in_fov": True}

    def locate(volume, config, mips, device="auto"):  # noqa: ANN001, ANN202
        return fabricated_location(state["in_fov"])

    def measure(volume, idx, config, device="auto"):  # noqa: ANN001, ANN202
        assert idx == L3_INDEX
        return fabricated_composition()

    monkeypatch.setattr(pipeline, "locate_l3", locate)
    monkeypatch.setattr(pipeline, "measure_composition", measure)
    return state
