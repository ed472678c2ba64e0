"""Received data sets with bounded memory: large ones go to a file as their P-DATA arrives.

pynetdicom collects a C-STORE's data set in an ``io.BytesIO`` until its last fragment, so a
1 GiB instance cost 1.4 GiB of the node's memory and nothing bounded its size (issue 16).
:class:`SpillingBuffer` takes that buffer's place (:func:`core.netpatch.bound_received_datasets`):

* up to ``node.spill_to_disk_mb`` it stays in memory, as before (every CT slice);
* beyond, what has arrived is moved to a file under ``<spool>/.incoming/`` (same file system
  as the spool, so the final write is a kernel copy) and the rest is appended there;
* beyond ``node.max_instance_mb`` the bytes are counted and dropped, and the handler answers
  0xA700 (Refused: Out of Resources) once the message is complete.

The handler then reads the data set through :class:`ReceivedDataset`: bytes, or a read-only
``mmap`` of the file whose pixel pages are never touched by the header walk.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "INCOMING_DIR",
    "ReceivedDataset",
    "SpillingBuffer",
    "clear_incoming",
    "spilling_factory",
]

#: Folder under the spool root for data sets being received (not a UID: the spool ignores it).
INCOMING_DIR = ".incoming"
_MIB = 1024 * 1024


class SpillingBuffer(io.BytesIO):
    """An ``io.BytesIO`` (pynetdicom checks the type) that spills to a file beyond a size.

    Parameters
    ----------
    spill_bytes : size (bytes) above which the content moves to a file.
    limit_bytes : size (bytes) above which further bytes are dropped (:attr:`overflow`).
    folder : where the spill file is made (created if missing).

    Attributes
    ----------
    size : bytes written so far (dropped ones included).
    path : the spill file, or None while in memory.
    overflow : True once more than ``limit_bytes`` were written.
    """

    def __init__(self, spill_bytes: int, limit_bytes: int, folder: Path) -> None:
        super().__init__()
        self.spill_bytes = spill_bytes
        self.limit_bytes = limit_bytes
        self.folder = folder
        self.size = 0
        self.path: Path | None = None
        self.overflow = False
        self._file: Any = None

    def write(self, data: Any) -> int:  # type: ignore[override]
        n = len(data)
        self.size += n
        if self.overflow:
            return n
        if self.size > self.limit_bytes:
            self.overflow = True
            self.discard()
            return n
        if self._file is None and self.size > self.spill_bytes:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="recv-", suffix=".part", dir=self.folder)
            self._file = os.fdopen(fd, "wb", buffering=1024 * 1024)
            self.path = Path(name)
            self._file.write(super().getbuffer())
            super().seek(0)
            super().truncate(0)
        if self._file is not None:
            self._file.write(data)
            return n
        return super().write(data)

    def finish(self) -> None:
        """Flush the spill file (the message is complete)."""
        if self._file is not None:
            self._file.flush()

    def discard(self) -> None:
        """Drop the content: close and delete the spill file, empty the memory."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        super().seek(0)
        super().truncate(0)


def clear_incoming(spool_root: Path) -> int:
    """Delete spill files a previous run left (it died while receiving); bytes freed.

    Called when the SCP starts, before any association: nothing is being received then.
    The sender of such an instance never got a success status and sends it again.
    """
    folder = spool_root / INCOMING_DIR
    freed = 0
    if folder.is_dir():
        for leftover in folder.iterdir():
            with contextlib.suppress(OSError):
                size = leftover.stat().st_size
                leftover.unlink()
                freed += size
    return freed


def spilling_factory(spool_root: Path, spill_mb: int, limit_mb: int) -> Any:
    """A ``() -> SpillingBuffer`` for :func:`core.netpatch.bound_received_datasets`."""
    folder = spool_root / INCOMING_DIR

    def make() -> SpillingBuffer:
        return SpillingBuffer(spill_mb * _MIB, limit_mb * _MIB, folder)

    return make


class ReceivedDataset:
    """The data set of one C-STORE, in memory or in its spill file.

    Use as a context manager; :attr:`data` is ``bytes`` or a read-only ``mmap`` (both
    support ``len``, slicing and ``struct.unpack_from``); on exit the map is closed and the
    spill file deleted. :attr:`path` is the spill file (None in memory).

    Parameters
    ----------
    buffer : the request's ``DataSet`` (a :class:`SpillingBuffer` or a plain ``BytesIO``).
    """

    def __init__(self, buffer: io.BytesIO) -> None:
        self.buffer = buffer
        self.path: Path | None = getattr(buffer, "path", None)
        self.size: int = getattr(buffer, "size", None) or len(buffer.getbuffer())
        self.overflow: bool = bool(getattr(buffer, "overflow", False))
        self._map: mmap.mmap | None = None
        self._fh: Any = None
        self.data: bytes | mmap.mmap = b""

    def __enter__(self) -> ReceivedDataset:
        if self.overflow:
            return self
        if self.path is None:
            self.data = self.buffer.getvalue()
            return self
        finish = getattr(self.buffer, "finish", None)
        if finish is not None:
            finish()
        self._fh = open(self.path, "rb")  # noqa: SIM115  (closed in __exit__)
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = self._map
        return self

    def __exit__(self, *exc: object) -> None:
        self.data = b""
        if self._map is not None:
            self._map.close()
        if self._fh is not None:
            self._fh.close()
        discard = getattr(self.buffer, "discard", None)
        if discard is not None:
            discard()

    def same_as(self, other: bytes | None) -> bool:
        """True when ``other`` holds exactly these bytes."""
        return other is not None and len(other) == self.size and other == self.data[:]
