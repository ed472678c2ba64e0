"""Load, small: 3 concurrent associations x 3 series x 40 instances -> one node, two workers.

The same run as ``bench/bench_load.py`` (which sends 10 x 20 x 500), scaled down: every
instance is acknowledged and on disk, every series is analysed exactly once (one attempt;
a clear ``failed`` record would also count, none is expected for these phantoms), and
Orthanc holds exactly the result objects of each series. Figures are printed, not asserted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.config import load_config
from core.jobs import JobState
from tests.conftest import require_shipped
from tests.support.node import ORTHANC, REDIS_SERVER, run_load

pytestmark = pytest.mark.integration


def test_concurrent_associations_every_instance_stored_every_series_analysed_once(
    tmp_path: Path,
) -> None:
    for prog in (ORTHANC, REDIS_SERVER):
        if not os.access(prog, os.X_OK):
            pytest.skip(f"{prog} not installed (see .ci/run)")
    cfg = load_config(environ={k: v for k, v in os.environ.items() if k != "L3SPOT_CONFIG"})
    require_shipped(cfg.locator.weights, "locator weights")
    report = run_load(tmp_path, n_associations=3, n_series=9, n_instances=40, timeout_s=240)
    print(report.summary())
    assert report.errors == []
    assert report.acknowledged == report.instances == 9 * 40
    assert report.stored == report.expected
    assert len(report.records) == 9
    for rec in report.records.values():
        assert rec.attempts == 1, rec.series_uid
        assert rec.state == JobState.DONE or (rec.state == JobState.FAILED and rec.reason), (
            rec.state
        )
    assert all(report.pacs_ok.values()), report.pacs_ok
    assert sum(r.state == JobState.DONE for r in report.records.values()) >= 1
