"""Ingest speed: ``l3spot serve`` vs dcmtk's ``storescp``, both fed by dcmtk's ``storescu``.

Generates one 500-slice 512 x 512 CT series (about 260 MB), then sends it with
``/usr/bin/storescu`` (one association) to

1. dcmtk ``/usr/bin/storescp`` writing to a folder (no fsync): the reference;
2. ``l3spot serve`` with the durable spool (fsync of every file and its folder);
3. ``l3spot serve`` with ``node.fsync: false`` (to show what durability costs).

Every process gets ``TCP_NODELAY=1`` (DESIGN.md, "Known pitfalls"). The node runs without
workers and with a long stable time, so only ingest is measured. Prints instances/s, MB/s
and the ratio to storescp (goal: >= 0.8), and the time of a one-instance association (what
association set-up costs). Readiness is checked with dcmtk ``echoscu``. Usage:
``python bench/bench_ingest.py [--slices N] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(folder: Path, n: int, size: int = 512) -> int:
    """Write an n-slice CT series; returns the total bytes."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2000, (size, size), dtype=np.int16)
    total = 0
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Ingest", "BENCH", "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def wait_port(port: int, aec: str, timeout_s: float = 60) -> None:
    """Wait until a C-ECHO (dcmtk echoscu) succeeds.

    A bare TCP connect would leave a half-open connection that the receiver keeps polling
    for seconds, during the measurement.
    """
    deadline = time.monotonic() + timeout_s
    echo = [ECHOSCU, "-aec", aec, "-to", "5", "127.0.0.1", str(port)]
    while time.monotonic() < deadline:
        if subprocess.run(echo, env=ENV, capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers on {port}")


def send(folder: Path, port: int, aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [STORESCU, "-aec", aec, "127.0.0.1", str(port), "+sd", str(folder)],
        check=True,
        env=ENV,
        capture_output=True,
    )
    return time.perf_counter() - t0


def measure(src: Path, port: int, aec: str) -> tuple[float, float]:
    """(seconds for the series in one association, best seconds of a 1-instance association)."""
    one = min(send(src / "one", port, aec) for _ in range(3))
    return send(src / "all", port, aec), one


def run_storescp(src: Path, work: Path) -> tuple[float, float]:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "-od", str(out), "-aet", "STORESCP", str(port)],
        env=ENV,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, "STORESCP")
        return measure(src, port, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(10)


def run_l3spot(src: Path, work: Path, fsync: bool, root: Path | None = None) -> tuple[float, float]:
    port = free_port()
    cfg = {
        "node": {
            "host": "127.0.0.1",
            "port": port,
            "spool_dir": str(work / f"var-{fsync}" / "spool"),
            "series_stable_seconds": 3600,
            "fsync": fsync,
        },
        "broker": {"url": None, "serve_starts_workers": False},
        "logging": {"level": "WARNING"},
    }
    path = work / f"config-{fsync}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "l3spot", "serve", "--config", str(path)], env=ENV, cwd=root
    )
    try:
        wait_port(port, "L3SPOT")
        return measure(src, port, "L3SPOT")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2, help="best of N per receiver")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run l3spot from this source tree (e.g. an older commit: "
        "git archive <commit> service worker | tar -x -C DIR), for before/after figures",
    )
    args = parser.parse_args()
    for prog in (STORESCU, STORESCP, ECHOSCU):
        if not os.access(prog, os.X_OK):
            sys.exit(f"{prog} missing (apt-get install dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="l3spot-bench-ingest-"))
    try:
        src = work / "series"
        total = make_series(src / "all", args.slices)
        (src / "one").mkdir()
        first = sorted((src / "all").iterdir())[0]
        shutil.copy(first, src / "one" / first.name)
        mb = total / 1e6
        print(f"series: {args.slices} instances, {mb:.1f} MB; best of {args.repeat}")
        results: dict[str, tuple[float, float]] = {}
        receivers = {
            "dcmtk storescp": lambda d: run_storescp(src, d),
            "l3spot serve (fsync)": lambda d: run_l3spot(src, d, True),
            "l3spot serve (no fsync)": lambda d: run_l3spot(src, d, False),
        }
        if args.baseline_tree is not None:
            tree = args.baseline_tree.resolve()
            receivers["baseline (fsync)"] = lambda d: run_l3spot(src, d, True, tree)
            receivers["baseline (no fsync)"] = lambda d: run_l3spot(src, d, False, tree)
        for k, (name, fn) in enumerate(receivers.items()):
            runs = []
            for i in range(args.repeat):
                run_dir = work / f"run-{k}-{i}"
                run_dir.mkdir()
                runs.append(fn(run_dir))
                shutil.rmtree(run_dir, ignore_errors=True)
            results[name] = (min(r[0] for r in runs), min(r[1] for r in runs))
        ref = results["dcmtk storescp"][0]
        print(
            f"{'receiver':26} {'s':>7} {'inst/s':>8} {'MB/s':>8} {'vs storescp':>12} "
            f"{'1-instance association s':>25}"
        )
        for name, (secs, one) in results.items():
            print(
                f"{name:26} {secs:7.2f} {args.slices / secs:8.1f} {mb / secs:8.1f} "
                f"{ref / secs:12.2f} {one:25.3f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
