"""Hostile peers against the SCP (issue 16): memory and time figures, with a reference.

Runs the SCP (:func:`service.scp.start_scp`, own spool and port in a temporary folder) in a
child process and, from this process and dcmtk's ``storescu``, measures:

* **large instance**: peak RSS growth (``VmHWM``) of the SCP process while a ``--mb`` MiB CT
  instance is stored, with ``node.spill_to_disk_mb`` at its default (streamed to disk) and,
  as the reference in the same run, set above the instance's size (held in memory, as
  before issue 16);
* **decompression bomb**: 1 MiB of Deflated Explicit VR Little Endian inflating to 1 GiB:
  status and peak RSS growth;
* **lock-out**: C-ECHO time (association + C-ECHO + release) with nobody else connected
  (reference), then with 12 idle and 12 trickling (one byte a second) connections open;
  time until a C-ECHO succeeds after 30 junk connections; time until an idle connection is
  closed (ARTIM).

Usage::

    python bench/bench_hostile.py            # 1024 MiB instance
    python bench/bench_hostile.py --mb 256   # quicker

Linux only (reads ``/proc``); needs ``/usr/bin/storescu`` (dcmtk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import scp  # noqa: E402
from tests.integration.test_hostile_input import ct_elements, encode  # noqa: E402
from tests.support.node import free_port, make_ct  # noqa: E402

MIB = 1024 * 1024
STORESCU = "/usr/bin/storescu"

NODE = textwrap.dedent(
    """
    import sys, time
    from core.config import Config
    from service import scp
    from service.spool import Spool
    cfg = Config.model_validate({"node": {"host": "127.0.0.1", "port": int(sys.argv[2]),
        "spool_dir": sys.argv[1] + "/spool", "spill_to_disk_mb": int(sys.argv[3]),
        "max_instance_mb": 4096, "artim_timeout_seconds": 10},
        "logging": {"audit_log": sys.argv[1] + "/audit.log"}})
    spool = Spool(cfg.node.spool_dir, cfg.node.resolved_quarantine_dir(), fsync=False)
    scp.start_scp(cfg, spool, lambda *a: None)
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def start_node(tmp: Path, spill_mb: int) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE, str(tmp), str(port), str(spill_mb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, port


def echo_s(port: int, source: str = "127.0.0.1") -> float | None:
    t0 = time.monotonic()
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return time.monotonic() - t0 if ok else None


def large_instance(tmp: Path, mb: int) -> None:
    size = int((mb * MIB / 2) ** 0.5)
    ds = make_ct(generate_uid(), generate_uid(), size=size)
    ds.PixelData = np.random.default_rng(0).integers(-1024, 2000, size * size, np.int16).tobytes()
    path = tmp / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    actual = path.stat().st_size / MIB
    print(f"large instance: {actual:.0f} MiB CT, sent by dcmtk storescu")
    for label, spill in (
        ("streamed to disk (default 16 MiB)", 16),
        ("in memory (reference)", 8192),
    ):
        node_tmp = Path(tempfile.mkdtemp(dir=tmp))
        proc, port = start_node(node_tmp, spill)
        try:
            base = _status(proc.pid, "VmRSS")
            t0 = time.monotonic()
            done = subprocess.run(
                [STORESCU, "-aet", "SCANNER", "-aec", "L3SPOT", "127.0.0.1", str(port), str(path)],
                capture_output=True,
            )
            took = time.monotonic() - t0
            peak = _status(proc.pid, "VmHWM")
            print(
                f"  {label:36s} exit {done.returncode}  peak RSS +{(peak - base) / MIB:6.0f} MiB"
                f"  ({took:.1f} s)"
            )
        finally:
            proc.kill()
            proc.wait()


def bomb(tmp: Path) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    head = encode(ct_elements(study, series, sop, size=8))[: -(8 * 8 * 2 + 12)]
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + (1024 * MIB).to_bytes(4, "little")
    d = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(64 * MIB)
    data = d.compress(head + pixel_header) + b"".join(d.compress(zeros) for _ in range(16))
    data += d.flush()
    meta = scp.file_meta_bytes(CTImageStorage, sop, DeflatedExplicitVRLittleEndian, "BOMBER")
    path = tmp / "bomb.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + data)
    proc, port = start_node(Path(tempfile.mkdtemp(dir=tmp)), 16)
    try:
        base = _status(proc.pid, "VmRSS")
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT")
        status = int(assoc.send_c_store(path).Status)
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False
        peak = _status(proc.pid, "VmHWM")
        print(
            f"decompression bomb: {len(data) / MIB:.1f} MiB -> 1024 MiB: status 0x{status:04X}, "
            f"peak RSS +{(peak - base) / MIB:.0f} MiB"
        )
    finally:
        proc.kill()
        proc.wait()


def lockout(tmp: Path, rq: bytes) -> None:
    proc, port = start_node(Path(tempfile.mkdtemp(dir=tmp)), 16)
    held: list[socket.socket] = []
    try:
        ref = statistics.median(echo_s(port) or float("nan") for _ in range(5))
        print(f"lock-out: C-ECHO alone (reference)              {ref * 1000:7.1f} ms")
        connected = time.monotonic()
        # 4 per source address (below node.max_pending_per_address): all 24 stay open
        for source in [f"127.0.0.{2 + i // 4}" for i in range(24)]:
            s = socket.socket()
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            held.append(s)
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(rq)):
                for s in held[12:]:
                    with contextlib.suppress(OSError):
                        s.send(rq[i : i + 1])
                if stop.wait(1.0):
                    return

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1.5)
        times = [echo_s(port) for _ in range(5)]
        ok = [t for t in times if t is not None]
        med = statistics.median(ok) if ok else float("nan")
        print(
            f"          with 12 idle + 12 trickling peers       {med * 1000:7.1f} ms "
            f"({len(ok)}/5 succeeded; {med / ref:.1f} x the reference)"
        )
        for s in held[:12]:
            s.settimeout(15)
            with contextlib.suppress(OSError):
                s.recv(10)
        artim = time.monotonic() - connected
        print(f"          12 idle peers closed (ARTIM 10 s) after {artim:7.1f} s")
        stop.set()
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", port)) as s, contextlib.suppress(OSError):
                s.sendall(os.urandom(64))
        t0 = time.monotonic()
        while echo_s(port) is None:
            pass
        after = (time.monotonic() - t0) * 1000
        print(f"          first C-ECHO after 30 junk connections  {after:7.1f} ms")
    finally:
        for s in held:
            s.close()
        proc.kill()
        proc.wait()


def associate_rq() -> bytes:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.network_timeout = 2
        ae.add_requested_context(Verification)
        t = threading.Thread(target=ae.associate, args=("127.0.0.1", srv.getsockname()[1]))
        t.start()
        conn, _ = srv.accept()
        data = b""
        while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
            data += conn.recv(65536)
        conn.close()
        t.join()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the large instance")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lockout(Path(tmp), associate_rq())
        bomb(Path(tmp))
        large_instance(Path(tmp), args.mb)


if __name__ == "__main__":
    main()
