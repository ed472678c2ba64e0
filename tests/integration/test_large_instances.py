"""Memory stays bounded whatever one instance weighs (issue 16).

Large data sets go to a file under the spool while they arrive (``node.spill_to_disk_mb``),
an instance beyond ``node.max_instance_mb`` is refused with 0xA700, and a Deflated data set
inflates at most to ``node.max_inflated_mb`` (a 1 MiB decompression bomb that inflates to
1 GiB is refused with 0xA700 and kept in quarantine). The sender is dcmtk's ``storescu`` in
its own process, so the peak memory measured here (``VmHWM`` of this process, reset before
each send through ``/proc/self/clear_refs``) is the node's. The 1 GiB figures are in
``bench/bench_large_instance.py``.
"""

from __future__ import annotations

import json
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from service import scp
from service.receive import INCOMING_DIR
from tests.integration.test_hostile_input import ct_elements, encode
from tests.support.node import make_ct
from tests.support.scp_node import MIB, ScpNode

STORESCU = "/usr/bin/storescu"


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _peak()


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-aet", "SCANNER", "-aec", "L3SPOT", "-xs", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _send_chunked(port: int, path: Path, ts: str | None = None) -> int:
    """C-STORE a file with pynetdicom, streamed from disk; the response status."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(
            CTImageStorage, [ts or pydicom.dcmread(path).file_meta.TransferSyntaxUID]
        )
        assoc = ae.associate("127.0.0.1", port, ae_title="L3SPOT")
        assert assoc.is_established
        status = int(assoc.send_c_store(path).Status)
        assoc.release()
        return status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _big_ct(tmp: Path, size: int) -> tuple[Path, str]:
    ds = make_ct(generate_uid(), generate_uid(), size=size)
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(-1024, 2000, size * size, dtype=np.int16).tobytes()
    path = tmp / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


@pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk storescu not installed")
def test_a_large_instance_is_streamed_to_disk_and_stored_intact(
    make_node: Callable[..., ScpNode], tmp_path: Path
) -> None:
    node = make_node(node={"spill_to_disk_mb": 4})
    path, sop = _big_ct(tmp_path, 5800)  # 67 MB of pixels
    before = _reset_peak()
    done = _storescu(node.port, path)
    grown = _peak() - before
    assert done.returncode == 0, done.stderr
    (stored,) = node.spool.root.rglob(f"{sop}.dcm")
    back, original = pydicom.dcmread(stored), pydicom.dcmread(path)
    assert back.PixelData == original.PixelData  # storescu may re-encode, pixels are equal
    assert back.SOPInstanceUID == sop
    assert grown < 30 * MIB, f"receiving 67 MB added {grown / MIB:.0f} MiB to the peak"
    assert not any((node.spool.root / INCOMING_DIR).iterdir())


@pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk storescu not installed")
def test_an_instance_beyond_max_instance_mb_is_refused_with_a700_and_leaves_nothing(
    make_node: Callable[..., ScpNode], tmp_path: Path
) -> None:
    node = make_node(node={"spill_to_disk_mb": 2, "max_instance_mb": 8})
    path, sop = _big_ct(tmp_path, 2500)  # 12.5 MB
    assert _send_chunked(node.port, path) == 0xA700
    assert not list(node.spool.root.rglob(f"{sop}.dcm"))
    assert not any((node.spool.root / INCOMING_DIR).iterdir())
    small, _ = _big_ct(tmp_path / "..", 64)
    assert _storescu(node.port, small).returncode == 0  # the node goes on


def test_a_decompression_bomb_is_refused_with_a700_kept_in_quarantine_and_memory_bounded(
    make_node: Callable[..., ScpNode], tmp_path: Path
) -> None:
    """1 MiB of Deflated Explicit VR Little Endian that inflates to 1 GiB (issue 16)."""
    node = make_node()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    # a valid 8 x 8 CT image whose Pixel Data element announces and holds 1 GiB of zeros
    head = encode(ct_elements(study, series, sop, size=8))[: -(8 * 8 * 2 + 12)]
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + (1024 * MIB).to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(head + pixel_header)]
    zeros = bytes(64 * MIB)
    for _ in range(16):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 2 * MIB
    meta = scp.file_meta_bytes(CTImageStorage, sop, DeflatedExplicitVRLittleEndian, "BOMBER")
    path = tmp_path / "bomb.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + bomb)
    before = _reset_peak()
    status = _send_chunked(node.port, path, DeflatedExplicitVRLittleEndian)
    grown = _peak() - before
    assert status == 0xA700
    assert grown < 200 * MIB, f"the bomb added {grown / MIB:.0f} MiB to the peak"
    (reason_file,) = node.spool.quarantine_dir.glob("*.reason.json")
    reason = json.loads(reason_file.read_text())
    assert "max_inflated_mb" in reason["reason"] and reason["status"] == "0xA700"
    kept = reason_file.with_name(reason_file.name.replace(".reason.json", ".bin"))
    assert kept.read_bytes() == bomb
    assert not (node.spool.root / study).exists()


def test_spill_files_a_crashed_node_left_are_deleted_when_the_scp_starts(
    make_node: Callable[..., ScpNode], tmp_path: Path
) -> None:
    leftover = tmp_path / "n0" / "spool" / INCOMING_DIR / "recv-dead.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * 1000)
    make_node()
    assert not leftover.exists()
