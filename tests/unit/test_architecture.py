"""Architecture guards: the node never loads torch or the worker; the layers import downwards
only; the module import graph has no cycle.

The import rules are read from the source (:mod:`research.import_graph`, also a command:
``python -m research.import_graph``); the torch rule is checked in a fresh process that
starts the node's whole code path (SCP, watcher, web page, queue) and exercises it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from research.import_graph import FORBIDDEN, build

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: import the node's modules, run the CLI's node commands'
# --help, start a node (embedded broker, no child workers, web page on), C-ECHO it, store a
# small series until it is queued, fetch every page, stop; print what was loaded.
NODE_PROCESS = textwrap.dedent(
    """
    import json, sys, tempfile, time, urllib.error, urllib.request
    from pathlib import Path

    import l3spot
    import service.node, service.scp, service.watcher, service.web.app  # noqa: F401
    import typer.main
    from click.testing import CliRunner

    cli = typer.main.get_command(l3spot.app)
    for name in ("serve", "jobs", "retry", "echo"):
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)

    import socket

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from core.config import Config
    from core.jobs import JobState, JobStore
    from service.node import Node

    # (not tests.support.node: it imports worker code for its SCU helpers)
    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def make_ct(study, series, i, size):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Arch^Test", "ARCH", "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = bytes(2 * size * size)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    tmp = Path(tempfile.mkdtemp(prefix="l3spot-arch-"))
    port, web_port = free_port(), free_port()
    cfg = Config.model_validate({
        "node": {"host": "127.0.0.1", "port": port, "spool_dir": str(tmp / "spool"),
                 "series_stable_seconds": 0.2, "watcher_interval_seconds": 0.1,
                 "min_slices": 1, "min_free_disk_mb": 0},
        "broker": {"url": None, "serve_starts_workers": False},
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
    })
    node = Node(cfg)
    node.start()
    try:
        ae = AE(ae_title="ARCHTEST")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=cfg.node.ae_title)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        study, series = generate_uid(), generate_uid()
        for i in range(3):
            assert int(assoc.send_c_store(make_ct(study, series, i, size=16)).Status) == 0
        assoc.release()
        jobs = JobStore(cfg.node.spool_dir)
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            try:
                state = jobs.get(series).state
            except Exception:
                state = None
            if state == JobState.QUEUED:
                break
            time.sleep(0.1)
        assert state == JobState.QUEUED, state
        base = f"http://127.0.0.1:{web_port}"
        pages = ("/", f"/jobs/{series}", "/healthz", "/metrics", "/measurements.csv", "/livez")
        pages += ("/readyz", "/destinations")
        for path in pages:
            with urllib.request.urlopen(base + path, timeout=10) as resp:
                assert resp.status == 200 and resp.read(), path
        for path in (f"/jobs/{series}/overview.png", f"/jobs/{series}/l3.png"):
            try:  # no results yet: 404, but through the views that read result folders
                urllib.request.urlopen(base + path, timeout=10)
            except urllib.error.HTTPError as exc:
                assert exc.code == 404, (path, exc.code)
    finally:
        node.stop()
    tops = ("torch", "torchvision", "worker", "research", "highdicom", "skimage")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in tops)
    print(json.dumps(loaded))
    """
)


@pytest.mark.slow  # over 2 s: the quick subset stays under 2 min
def test_the_node_process_loads_neither_torch_nor_the_worker_nor_research() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("L3SPOT_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", NODE_PROCESS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    packages = sorted({m.split(".")[0] for m in loaded})
    assert packages == [], f"the node process loaded {packages}: {loaded[:20]}"


def test_core_and_service_import_nothing_of_the_layers_above() -> None:
    """``core`` imports nothing of service/worker/research/l3spot, ``service`` nothing of
    worker/research, ``worker`` nothing of service/research: at module level, in functions,
    and in ``if TYPE_CHECKING:`` blocks (core describes the worker's results with protocols,
    :mod:`core.result`, instead of importing them for type hints)."""
    graph = build(ROOT)
    assert set(FORBIDDEN) == {"core", "service", "worker"}
    bad = [
        f"{imp.source}:{imp.lineno} imports {imp.target}"
        + (
            " (TYPE_CHECKING)"
            if imp.type_checking
            else ""
            if imp.module_level
            else " (in a function)"
        )
        for imp in graph.violations()
    ]
    assert bad == []


def test_the_rule_scanner_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    for pkg in ("core", "service", "worker", "research"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "worker" / "tasks.py").write_text("")
    (tmp_path / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from worker.tasks import x\n"
        "def f():\n    from ..service import y\n"
    )
    (tmp_path / "service" / "b.py").write_text(
        "try:\n    import worker.tasks\nexcept ImportError:\n    pass\n"
    )
    graph = build(tmp_path)
    got = {(i.source, i.target, i.module_level, i.type_checking) for i in graph.violations()}
    assert got == {
        ("core.a", "worker.tasks", False, True),
        ("core.a", "service", False, False),
        ("service.b", "worker.tasks", True, False),
    }


def test_module_level_import_graph_has_no_cycle() -> None:
    """Imports that run at import time (the ones that can deadlock or half-initialise a module)
    form no cycle; ``python -m research.import_graph`` prints them."""
    assert build(ROOT).cycles() == []


def _function_level_cycles() -> list[list[str]]:
    from research.import_graph import _one_cycle, _strongly_connected

    edges = build(ROOT).edges(module_level_only=False)
    return sorted(_one_cycle(edges, sorted(s)) for s in _strongly_connected(edges) if len(s) > 1)


def test_no_cycle_even_through_function_level_imports() -> None:
    """A function-level import that points back up (``coarse`` importing ``fine`` inside a
    function while ``fine`` imports ``coarse``) is a cycle in the design even if Python
    tolerates it."""
    assert _function_level_cycles() == []


def test_the_cycle_finder_reports_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "__init__.py").write_text("")
    (tmp_path / "worker" / "a.py").write_text("from worker import b\n")
    (tmp_path / "worker" / "b.py").write_text("import worker.c\n")
    (tmp_path / "worker" / "c.py").write_text("from .a import thing\n")
    assert build(tmp_path).cycles() == [["worker.a", "worker.b", "worker.c", "worker.a"]]
