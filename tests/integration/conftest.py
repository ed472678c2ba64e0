"""Fixtures shared by the network tests."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import chromium
from tests.support.scp_node import make_node  # noqa: F401  (fixture)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium driven by selenium (:func:`tests.support.browser.chromium`)."""
    with chromium(tmp_path) as driver:
        yield driver
