"""The node's start: time until C-ECHO succeeds and resident memory (RSS), vs a bare SCP.

Starts ``l3spot serve`` (embedded broker, own spool and port in a temporary folder) and,
as the reference measured in the same run, a minimal pynetdicom Verification SCP in a
fresh interpreter (``import pynetdicom``, ``AE.start_server``: what any Python DICOM node
costs). For each: seconds from process start until a C-ECHO succeeds, and the process's
VmRSS (MB) once it answers and again after ``--settle`` seconds. By default the node runs
with ``broker.serve_starts_workers: false`` (the node process alone); ``--workers`` lets it
start its own analysis and export workers as it does by default, and also prints their RSS.

``--root DIR`` runs the node from another checkout (``PYTHONPATH=DIR``; the entry is
``python -m l3spot`` where ``DIR/l3spot.py`` exists, else the pre-restructure
``python -m service.cli``), e.g. the pre-restructure commit::

    git worktree add /work/wt-old 3f00460
    python bench/bench_node_start.py --root /work/wt-old
    python bench/bench_node_start.py            # this checkout

Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = textwrap.dedent(
    """
    import sys, time
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="REFERENCE")
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False)
    while True:
        time.sleep(1)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """VmRSS of one process, MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Direct and indirect child processes of ``pid`` (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def echo_ok(port: int, ae_title: str) -> bool:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return "Status" in status and int(status.Status) == 0


def measure(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    ae_title: str,
    settle_s: float,
    timeout_s: float,
    cwd: Path = ROOT,
) -> dict[str, float]:
    """Start ``cmd`` in ``cwd``; seconds to the first successful C-ECHO, RSS then and after
    settling, and the RSS of its child processes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,  # python -m looks in the working directory before PYTHONPATH
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not echo_ok(port, ae_title):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{cmd}: no C-ECHO after {timeout_s} s")
            time.sleep(0.05)
        start_s = time.perf_counter() - t0
        rss_at_echo = rss_mb(proc.pid)
        time.sleep(settle_s)
        kids = children(proc.pid)
        return {
            "start_s": start_s,
            "rss_echo_mb": rss_at_echo,
            "rss_mb": rss_mb(proc.pid),
            "children": float(len(kids)),
            "children_rss_mb": sum(rss_mb(k) for k in kids),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait()


def node_command(root: Path, config: Path) -> list[str]:
    entry = "l3spot" if (root / "l3spot.py").is_file() else "service.cli"
    return [sys.executable, "-m", entry, "serve", "--config", str(config)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to run the node from")
    ap.add_argument("--workers", action="store_true", help="let serve start its own workers")
    ap.add_argument("--web", action="store_true", help="also serve the operators' web page")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after the first echo")
    args = ap.parse_args()
    root = args.root.resolve()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("L3SPOT")},
        "PYTHONPATH": str(root),
        "TCP_NODELAY": "1",
    }
    ref, node = [], []
    with tempfile.TemporaryDirectory(prefix="l3spot-bench-start-") as tmp:
        for i in range(args.repeat):
            port = free_port()
            ref.append(
                measure(
                    [sys.executable, "-c", REFERENCE, str(port)], env, port, "REFERENCE", 0.0, 60
                )
            )
            port = free_port()
            cfg = {
                "node": {
                    "host": "127.0.0.1",
                    "port": port,
                    "spool_dir": f"{tmp}/{i}/spool",
                    "min_free_disk_mb": 0,
                },
                "broker": {"url": None, "serve_starts_workers": bool(args.workers)},
                "web": {"enabled": bool(args.web), "host": "127.0.0.1", "port": free_port()},
                "logging": {"level": "WARNING"},
            }
            path = Path(tmp) / f"config{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            settle = max(args.settle, 20.0) if args.workers else args.settle
            node.append(
                measure(node_command(root, path), env, port, "L3SPOT", settle, 120, cwd=root)
            )

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"node from {root} ({' '.join(node_command(root, Path('CONFIG'))[1:])})")
    print(f"workers started by serve: {args.workers}; web page: {args.web}; runs: {args.repeat}")
    print(f"{'':34}{'start to C-ECHO (s)':>20}{'RSS at echo (MB)':>18}{'RSS settled (MB)':>18}")
    for name, rows in (
        ("reference: bare pynetdicom SCP", ref),
        ("l3spot serve (node process)", node),
    ):
        print(
            f"{name:34}{med(rows, 'start_s'):>20.2f}{med(rows, 'rss_echo_mb'):>18.0f}"
            f"{med(rows, 'rss_mb'):>18.0f}"
        )
    print(
        f"ratio node / reference: start {med(node, 'start_s') / med(ref, 'start_s'):.2f}, "
        f"RSS {med(node, 'rss_mb') / med(ref, 'rss_mb'):.2f}"
    )
    if args.workers:
        print(
            f"its {med(node, 'children'):.0f} child processes (workers, after 20 s): "
            f"{med(node, 'children_rss_mb'):.0f} MB RSS together"
        )


if __name__ == "__main__":
    main()
