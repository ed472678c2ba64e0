"""Export: results reach a C-STORE SCP on one association; failures carry the remote status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from core.config import Destination, ExportConfig
from core.layout import result_files
from tests.support.node import free_port, make_ct
from worker.export import backoff_seconds, send_results


class Pacs:
    """A pynetdicom C-STORE SCP answering ``status`` and recording what it got."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.received: list[Dataset] = []
        self.associations: set[int] = set()
        self.port = free_port()
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        self.associations.add(id(event.assoc))
        self.received.append(event.dataset)
        return self.status

    @property
    def destination(self) -> Destination:
        return Destination(ae_title="PACS", host="127.0.0.1", port=self.port)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    study, series = generate_uid(), generate_uid()
    for i, name in enumerate(("seg.dcm", "sr.dcm", "sc.dcm")):
        make_ct(study, series, i).save_as(tmp_path / name, enforce_file_format=True)
    return tmp_path


@pytest.fixture()
def pacs() -> Iterator[Pacs]:
    p = Pacs()
    yield p
    p.ae.shutdown()


def test_three_objects_go_over_one_association(pacs: Pacs, results: Path) -> None:
    files = result_files(results)
    assert [f.name for f in files] == ["seg.dcm", "sr.dcm", "sc.dcm"]
    outcome = send_results(files, pacs.destination, "L3SPOT", timeout_s=10)
    assert outcome.ok and outcome.status is None
    assert len(pacs.received) == 3 and len(pacs.associations) == 1
    assert outcome.stored == [str(d.SOPInstanceUID) for d in pacs.received]


def test_missing_seg_is_not_sent(pacs: Pacs, results: Path) -> None:
    (results / "seg.dcm").unlink()
    assert [f.name for f in result_files(results)] == ["sr.dcm", "sc.dcm"]


def test_remote_failure_status_is_reported(results: Path) -> None:
    full = Pacs(status=0xA700)
    try:
        outcome = send_results(result_files(results), full.destination, "L3SPOT", timeout_s=10)
    finally:
        full.ae.shutdown()
    assert not outcome.ok
    assert outcome.status == "0xA700"
    assert "PACS@127.0.0.1" in (outcome.error or "")
    assert len(full.received) == 1  # stops at the first refusal


def test_unreachable_destination_is_an_outcome_not_an_exception(results: Path) -> None:
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    outcome = send_results(result_files(results), dest, "L3SPOT", timeout_s=3)
    assert not outcome.ok and outcome.status is None and "association" in (outcome.error or "")


def test_backoff_doubles_and_is_capped() -> None:
    cfg = ExportConfig(backoff_initial_seconds=2, backoff_max_seconds=10)
    assert [backoff_seconds(a, cfg) for a in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
    assert Destination(ae_title="X", host="h", port=1).label == "X@h:1"
