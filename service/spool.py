"""Durable spool: every acknowledged instance is on disk, whole, before the SCP says 0x0000.

Layout::

    <spool_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <quarantine_dir>/<time>-<id>.bin  +  <time>-<id>.reason.json

Writes go to a temporary file in the target folder, are flushed and ``fsync``-ed, then
renamed over the final name (``os.replace``, atomic on POSIX) and the folder is ``fsync``-ed
so the rename itself survives a power cut. A reader therefore sees either no file or a
complete one; a re-sent instance atomically replaces the earlier copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A DICOM UID (PS3.5 section 9.1): digits and dots, at most 64 characters. Checking this
#: before a UID becomes a path also keeps ``..`` and ``/`` out of the spool.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PREAMBLE = b"\x00" * 128 + b"DICM"
TMP_PREFIX = ".tmp-"


class SpoolWriteError(OSError):
    """Writing an instance to the spool failed (disk full, permissions, I/O error)."""


def is_valid_uid(uid: str | None) -> bool:
    """True when ``uid`` is a syntactically valid DICOM UID (PS3.5 section 9.1)."""
    return bool(uid) and len(uid) <= 64 and _UID_RE.match(uid) is not None  # type: ignore[arg-type]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[bytes]
    ) -> Path:
        """Write one instance durably and return its final path.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : the instance's UIDs (validated as DICOM UIDs).
        chunks : the bytes of the Part 10 file, in order (preamble, file meta, data set).

        Raises
        ------
        ValueError
            A UID is invalid.
        SpoolWriteError
            The disk refused the write; nothing is left at the final path.
        """
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOPInstanceUID {sop_uid!r}")
        folder = self.series_dir(study_uid, series_uid)
        final = folder / f"{sop_uid}.dcm"
        tmp = folder / f"{TMP_PREFIX}{sop_uid}.{uuid.uuid4().hex[:8]}"
        try:
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                self._known_dirs.add(folder)
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._known_dirs.discard(folder)
            raise SpoolWriteError(exc.errno, f"cannot write {final.name}: {exc.strerror}") from exc
        return final

    def quarantine(self, raw: bytes, reason: str, context: dict[str, Any]) -> Path:
        """Keep input the node could not store, with a JSON reason file beside it.

        Parameters
        ----------
        raw : the bytes received (file meta + data set, as far as available).
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
        payload = {"reason": reason, "received_at": time.time(), "bytes": len(raw), **context}
        for path, content in ((data, raw), (info, json.dumps(payload, indent=1).encode())):
            tmp = path.with_name(TMP_PREFIX + path.name)
            with open(tmp, "wb") as fh:
                fh.write(content)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
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

    def find_series(self, series_uid: str) -> SeriesRef | None:
        """The spool folder of a Series Instance UID, or ``None``."""
        for ref in self.iter_series():
            if ref.series_uid == series_uid:
                return ref
        return None


def instance_files(series_dir: Path) -> list[Path]:
    """The complete instance files of a series folder (temporary files excluded), sorted."""
    return sorted(p for p in series_dir.glob("*.dcm") if not p.name.startswith(TMP_PREFIX))
