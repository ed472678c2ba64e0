"""Durable spool: every acknowledged instance is on disk, whole, before the SCP says 0x0000.

Layout::

    <spool_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <quarantine_dir>/<time>-<id>.bin  +  <time>-<id>.reason.json

Each instance is written to a temporary file in its series folder with one ``writev``,
``fdatasync``-ed (the data and the size/blocks needed to read it back; ``fsync`` would
also flush the timestamps), renamed to its final name (``os.replace``, atomic on POSIX),
and the folder is ``fsync``-ed so that the rename survives a power cut. Only then does the
SCP acknowledge. A reader (or a node restarted after a crash) therefore sees either no file
or a complete one at the final name. The rename must not happen before the data is durable:
with delayed allocation a crash could otherwise leave the final name pointing at an empty
or partial file. When a series folder (and its study folder) is created, their parents are
fsynced once, so the folder entries are durable too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import L3SpotError

#: A DICOM UID (PS3.5 section 9.1): digits and dots, at most 64 characters. Checking this
#: before a UID becomes a path also keeps ``..`` and ``/`` out of the spool.
#: PS3.5 section 9.1 UID syntax; used with ``fullmatch`` (``$`` would also match before a
#: final newline, and a folder name ending in a newline would be created).
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
PREAMBLE = b"\x00" * 128 + b"DICM"
TMP_PREFIX = ".tmp-"


class SpoolWriteError(L3SpotError, OSError):
    """Writing an instance to the spool failed (disk full, permissions, I/O error)."""


class SeriesBusyError(L3SpotError):
    """A series folder cannot be removed now: an instance is being written into it."""


def is_valid_uid(uid: str | None) -> bool:
    """True when ``uid`` is a syntactically valid DICOM UID (PS3.5 section 9.1)."""
    return bool(uid) and len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None  # type: ignore[arg-type]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What :meth:`Spool.write_instance` and :meth:`Spool.quarantine` write: bytes, or a file
#: whose whole content is copied by the kernel (a data set spilled to disk while received,
#: :mod:`service.receive`), never read into memory.
Chunk = bytes | Path


def _writev_all(fd: int, chunks: list[bytes]) -> None:
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _copy_file(fd: int, source: Path) -> None:
    with open(source, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(fd, src.fileno(), offset, min(size - offset, 1 << 30))
            if sent == 0:
                raise OSError(f"{source}: shorter than its size")
            offset += sent


def _write_all(fd: int, chunks: list[Chunk]) -> None:
    """``writev`` the byte chunks, continuing after short writes; copy file chunks."""
    pending: list[bytes] = []
    for chunk in chunks:
        if isinstance(chunk, Path):
            _writev_all(fd, pending)
            pending = []
            _copy_file(fd, chunk)
        else:
            pending.append(chunk)
    _writev_all(fd, pending)


def _chunk_size(chunk: Chunk) -> int:
    return chunk.stat().st_size if isinstance(chunk, Path) else len(chunk)


def dataset_offset(head: bytes) -> int:
    """Offset of the data set in a Part 10 file written by :class:`Spool` (after the meta).

    Raises
    ------
    ValueError
        ``head`` does not start with preamble, ``DICM`` and a (0002,0000) group length.
    """
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("not a Part 10 file with a File Meta group length")
    return 144 + int.from_bytes(head[140:144], "little")


@dataclass(frozen=True)
class SeriesRef:
    """A series folder in the spool."""

    study_uid: str
    series_uid: str
    path: Path


class Spool:
    """The spool and quarantine folders of one node.

    Parameters
    ----------
    spool_dir : root of ``<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.
    quarantine_dir : where unreadable inputs go, each with a ``.reason.json``.
    fsync : flush file and folder to stable storage before returning (disable only in
        throw-away benchmarks).
    """

    def __init__(self, spool_dir: Path, quarantine_dir: Path, fsync: bool = True) -> None:
        self.root = Path(spool_dir)
        self.quarantine_dir = Path(quarantine_dir)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        #: SOP Instance UID -> (Study, Series) of every instance in the spool, built on first
        #: use (:meth:`sop_owner`) and kept up to date by :meth:`write_instance`
        self._sop_index: dict[str, tuple[str, str]] | None = None
        self._index_lock = threading.Lock()
        #: series folder -> instances being written into it now (:meth:`remove_series` waits
        #: for none); guarded by ``_index_lock``
        self._writing: dict[Path, int] = {}

    def build_sop_index(self) -> int:
        """Index every spooled instance by SOP Instance UID (once, at the SCP's start).

        A walk of the spool folders (file names are SOP Instance UIDs); returns the count.
        """
        index: dict[str, tuple[str, str]] = {}
        for ref in self.iter_series():
            for f in instance_files(ref.path):
                index[f.stem] = (ref.study_uid, ref.series_uid)
        with self._index_lock:
            self._sop_index = index
        return len(index)

    def sop_owner(self, sop_uid: str) -> tuple[str, str] | None:
        """(Study, Series) Instance UIDs under which ``sop_uid`` is stored, or None.

        An entry whose file is gone (a series moved to quarantine) is forgotten.
        """
        if self._sop_index is None:
            self.build_sop_index()
        with self._index_lock:
            owner = self._sop_index.get(sop_uid) if self._sop_index is not None else None
        if owner is not None and not self.instance_path(*owner, sop_uid).exists():
            with self._index_lock:
                if self._sop_index is not None:
                    self._sop_index.pop(sop_uid, None)
            return None
        return owner

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Folder of a series.

        Raises
        ------
        ValueError
            A UID is not a valid DICOM UID (it would be unsafe as a path component).
        """
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid {name} {uid!r}")
        return self.root / study_uid / series_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance (UIDs validated, see :meth:`series_dir`)."""
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOPInstanceUID {sop_uid!r}")
        return self.series_dir(study_uid, series_uid) / f"{sop_uid}.dcm"

    def same_dataset(self, study_uid: str, series_uid: str, sop_uid: str, data: Any) -> bool | None:
        """Compare a stored instance's data set with ``data`` in 1 MiB pieces.

        Parameters
        ----------
        data : the received data set (``bytes`` or an ``mmap``).

        Returns
        -------
        None when no such instance is stored, else whether its data set equals ``data``
        (an identical re-send versus a conflicting one with the same UID).
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        try:
            fh = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return None
        with fh:
            head = fh.read(144)
            try:
                offset = dataset_offset(head)
            except ValueError:
                offset = 0
            if os.fstat(fh.fileno()).st_size - offset != len(data):
                return False
            fh.seek(offset)
            step = 1 << 20
            for start in range(0, len(data), step):
                if fh.read(step) != data[start : start + step]:
                    return False
        return True

    def existing_dataset(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes | None:
        """The data set bytes (after the File Meta) of a stored instance, or None if absent.

        Used to tell an identical re-send from a conflicting one with the same UID.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return data[dataset_offset(data[:144]) :]
        except ValueError:
            return data

    def _make_series_dir(self, folder: Path) -> None:
        """Create the study/series folders; fsync the parents of those that are new."""
        created = [p for p in (folder.parent, folder) if not p.is_dir()]
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for p in created:
                _fsync_dir(p.parent)
        self._known_dirs.add(folder)

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[Chunk]
    ) -> Path:
        """Write one instance durably and return its final path.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : the instance's UIDs (validated as DICOM UIDs).
        chunks : the Part 10 file, in order (preamble, file meta, data set): bytes, or a
            file whose content is copied by the kernel (a data set spilled while received).

        Raises
        ------
        ValueError
            A UID is invalid.
        SpoolWriteError
            The disk refused the write; nothing is left at the final path.
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        folder = final.parent
        tmp = folder / f"{TMP_PREFIX}{sop_uid}.{uuid.uuid4().hex[:8]}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        with self._index_lock:  # remove_series leaves a folder alone while this runs
            self._writing[folder] = self._writing.get(folder, 0) + 1
        try:
            if folder not in self._known_dirs:
                self._make_series_dir(folder)
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # deleted by retention in another process (the CLI)
                self._make_series_dir(folder)
                fd = os.open(tmp, flags, 0o644)
            try:
                _write_all(fd, chunks)
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(folder)
            with self._index_lock:
                if self._sop_index is not None:
                    self._sop_index[sop_uid] = (study_uid, series_uid)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._known_dirs.discard(folder)
            raise SpoolWriteError(
                exc.errno,
                f"cannot write {final.name}: {exc.strerror}",
                series_uid=series_uid,
                study_uid=study_uid,
            ) from exc
        finally:
            with self._index_lock:
                left = self._writing.pop(folder) - 1
                if left:
                    self._writing[folder] = left
        return final

    def remove_series(self, study_uid: str, series_uid: str) -> int:
        """Delete a series folder and forget its instances (retention, issue 16).

        The folder is first renamed out of the spool (atomic), under the lock that
        :meth:`write_instance` registers its writes with: a write that started earlier makes
        this refuse, a write that starts later creates a fresh folder. The SOP Instance
        UIDs leave the index, so the same instances can be stored again later (a study sent
        again months after). The study folder goes too when it was its last series.

        Parameters
        ----------
        study_uid, series_uid : the series' UIDs (validated, see :meth:`series_dir`).

        Returns
        -------
        int
            Bytes freed (apparent size of the deleted files); 0 when the folder was absent.

        Raises
        ------
        SeriesBusyError
            An instance of the series is being written now.
        OSError
            The folder could not be renamed or deleted.
        """
        folder = self.series_dir(study_uid, series_uid)
        if not folder.is_dir():
            return 0
        sops = [p.stem for p in instance_files(folder)]
        size = folder_bytes(folder)
        trash = self.root / f"{TMP_PREFIX}purge-{uuid.uuid4().hex[:12]}"
        with self._index_lock:
            if self._writing.get(folder):
                raise SeriesBusyError(
                    "an instance is being written", series_uid=series_uid, study_uid=study_uid
                )
            os.replace(folder, trash)
            self._known_dirs.discard(folder)
            if self._sop_index is not None:
                for sop in sops:
                    if self._sop_index.get(sop) == (study_uid, series_uid):
                        del self._sop_index[sop]
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # the study folder, when that was its last series
            folder.parent.rmdir()
        if self.fsync:
            _fsync_dir(self.root)
        return size

    def quarantine(self, raw: Chunk, reason: str, context: dict[str, Any]) -> Path:
        """Keep input the node could not store, with a JSON reason file beside it.

        Parameters
        ----------
        raw : the bytes received (file meta + data set, as far as available), or the file
            they were spilled to (copied, not read into memory).
        reason : why it could not be stored.
        context : UIDs, calling AE title, peer address, transfer syntax... Never patient
            name, ID or birth date.

        Returns
        -------
        Path of the quarantined data file (``<time>-<id>.bin``).
        """
        stem = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]
        data = self.quarantine_dir / f"{stem}.bin"
        info = self.quarantine_dir / f"{stem}.reason.json"
        payload = {
            "reason": reason,
            "received_at": time.time(),
            "bytes": _chunk_size(raw),
            **context,
        }
        for path, content in ((data, raw), (info, json.dumps(payload, indent=1).encode())):
            tmp = path.with_name(TMP_PREFIX + path.name)
            with open(tmp, "wb") as fh:
                _write_all(fh.fileno(), [content])
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(self.quarantine_dir)
        return data

    def iter_series(self) -> Iterator[SeriesRef]:
        """Every series folder currently in the spool (no particular order)."""
        if not self.root.is_dir():
            return
        for study in self.root.iterdir():
            if not study.is_dir() or not is_valid_uid(study.name):
                continue
            for series in study.iterdir():
                if series.is_dir() and is_valid_uid(series.name):
                    yield SeriesRef(study.name, series.name, series)

    def series_folders(self, series_uid: str) -> list[SeriesRef]:
        """Every spool folder holding ``series_uid``, one per Study Instance UID it came
        under (more than one only when a sender reused a Series UID in another study)."""
        if not self.root.is_dir() or not is_valid_uid(series_uid):
            return []
        refs = []
        for study in self.root.iterdir():
            folder = study / series_uid
            if is_valid_uid(study.name) and folder.is_dir():
                refs.append(SeriesRef(study.name, series_uid, folder))
        return refs

    def quarantine_folder(self, folder: Path, reason: str, context: dict[str, Any]) -> Path:
        """Move a whole series folder into quarantine, with a JSON reason file beside it.

        Nothing is lost: the instances keep their bytes and names under
        ``<quarantine>/<time>-<id>.series/``; the reason file carries UIDs and counts only.
        """
        stem = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{stem}.series"
        n = len(instance_files(folder))
        shutil.move(str(folder), str(target))  # a rename on the same file system
        with contextlib.suppress(OSError):  # the study folder, when that was its only series
            folder.parent.rmdir()
        info = self.quarantine_dir / f"{stem}.reason.json"
        payload = {"reason": reason, "quarantined_at": time.time(), "instances": n, **context}
        tmp = info.with_name(TMP_PREFIX + info.name)
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(payload, indent=1).encode())
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, info)
        if self.fsync:
            _fsync_dir(self.quarantine_dir)
        return target

    def series_path(self, series_uid: str, recorded: str | Path | None) -> Path | None:
        """Where a job's series is: the folder its record names while that still exists,
        else the spool's folder of the Series UID (the record predates a move), else None.

        The one fallback the node's reconciliation and ``l3spot retry`` share.
        """
        if recorded:
            folder = Path(recorded)
            if folder.is_dir():
                return folder
        ref = self.find_series(series_uid)
        return ref.path if ref is not None else None

    def find_series(self, series_uid: str) -> SeriesRef | None:
        """The spool folder of a Series Instance UID, or ``None``."""
        for ref in self.iter_series():
            if ref.series_uid == series_uid:
                return ref
        return None


def folder_bytes(folder: Path) -> int:
    """Apparent size (bytes) of every file under ``folder``; 0 if it is absent."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def instance_files(series_dir: Path) -> list[Path]:
    """The complete instance files of a series folder (temporary files excluded), sorted."""
    return sorted(p for p in series_dir.glob("*.dcm") if not p.name.startswith(TMP_PREFIX))
