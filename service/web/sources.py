"""Where a series came from, and header facts the job records do not hold.

The job records (:mod:`core.jobs`) hold UIDs, states and timings only. The web page
also filters by calling AE title and study date, so the node keeps a second small SQLite
database beside them, ``<spool_dir>/web.sqlite``, with one row per series:

* ``calling_ae`` / ``address``: written by the SCP hook (:class:`service.metrics.ScpObserver`)
  the first time a series arrives on an association (and again when another sender resends);
* ``study_date``, ``series_description``, ``modality``: read once from the header of one
  spooled instance (:func:`read_header_facts`) and cached.

No patient name, ID or birth date is stored here. When ``web.show_patient_identifiers`` is
on, they are read from the spooled header on demand (:func:`read_patient_identifiers`) and
never written anywhere.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

DB_NAME = "web.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series_info (
    series_uid         TEXT PRIMARY KEY,
    calling_ae         TEXT,
    address            TEXT,
    study_date         TEXT,
    series_description TEXT,
    modality           TEXT,
    header_read        INTEGER NOT NULL DEFAULT 0,
    first_seen         REAL NOT NULL
);
"""

_HEADER_TAGS = ("StudyDate", "SeriesDescription", "Modality")


@dataclass
class SeriesInfo:
    """What the page knows about a series beyond its job record ("" when unknown).

    ``study_date`` is the DICOM DA value ``YYYYMMDD`` (PS3.5 Table 6.2-1).
    """

    series_uid: str
    calling_ae: str = ""
    address: str = ""
    study_date: str = ""
    series_description: str = ""
    modality: str = ""
    header_read: bool = False


def _first_instance(series_dir: Path) -> Path | None:
    if not series_dir.is_dir():
        return None
    return next((p for p in sorted(series_dir.glob("*.dcm")) if not p.name.startswith(".")), None)


def read_header_facts(series_dir: Path) -> dict[str, str]:
    """Study date, series description and modality from one spooled instance.

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>`` (Part 10 files named ``*.dcm``).

    Returns
    -------
    dict with keys ``study_date`` (``YYYYMMDD`` or ""), ``series_description``, ``modality``;
    empty when the folder holds no readable instance.
    """
    path = _first_instance(series_dir)
    if path is None:
        return {}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except (InvalidDicomError, OSError, ValueError):
        return {}
    return {
        "study_date": str(ds.get("StudyDate", "") or "").strip(),
        "series_description": str(ds.get("SeriesDescription", "") or "").strip(),
        "modality": str(ds.get("Modality", "") or "").strip(),
    }


def read_patient_identifiers(series_dir: Path) -> tuple[str, str] | None:
    """(Patient's Name, Patient ID) of a spooled series, read on demand and never stored.

    Only called when ``web.show_patient_identifiers`` is true. None when unreadable.
    """
    path = _first_instance(series_dir)
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"]
        )
    except (InvalidDicomError, OSError, ValueError):
        return None
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")


class SeriesSources:
    """The ``web.sqlite`` table of calling AE titles and cached header facts.

    Parameters
    ----------
    spool_dir : the node's spool folder (the database lives beside ``jobs.sqlite``).

    Notes
    -----
    Short-lived connections per call (threads of the SCP and of the web server share one
    instance); WAL mode so the page reads while the SCP writes.
    """

    def __init__(self, spool_dir: Path) -> None:
        self.path = Path(spool_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            yield con
        finally:
            con.close()

    def record_sender(self, series_uid: str, calling_ae: str, address: str) -> None:
        """The series arrived from ``calling_ae`` at ``address`` (latest sender wins)."""
        with self._connect() as con:
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(
                "INSERT INTO series_info (series_uid, calling_ae, address, first_seen)"
                " VALUES (?,?,?,?) ON CONFLICT(series_uid) DO UPDATE SET"
                " calling_ae=excluded.calling_ae, address=excluded.address",
                (series_uid, calling_ae, address, time.time()),
            )

    def all(self) -> dict[str, SeriesInfo]:
        """Every row, by Series Instance UID."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM series_info").fetchall()
        return {r["series_uid"]: self._info(r) for r in rows}

    def get(self, series_uid: str) -> SeriesInfo:
        """The row of one series (an empty :class:`SeriesInfo` when none)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT * FROM series_info WHERE series_uid=?", (series_uid,)
            ).fetchone()
        return self._info(row) if row is not None else SeriesInfo(series_uid)

    def complete(self, info: SeriesInfo, series_dir: Path | None) -> SeriesInfo:
        """``info`` with the header facts filled in (read once from the spool, then cached).

        A series whose folder is gone (or not yet there) is retried on a later call.
        """
        if info.header_read or series_dir is None:
            return info
        facts = read_header_facts(series_dir)
        if not facts:
            return info
        with self._connect() as con:
            con.execute(
                "INSERT INTO series_info (series_uid, study_date, series_description, modality,"
                " header_read, first_seen) VALUES (?,?,?,?,1,?) ON CONFLICT(series_uid) DO"
                " UPDATE SET study_date=excluded.study_date,"
                " series_description=excluded.series_description,"
                " modality=excluded.modality, header_read=1",
                (
                    info.series_uid,
                    facts["study_date"],
                    facts["series_description"],
                    facts["modality"],
                    time.time(),
                ),
            )
        info.study_date = facts["study_date"]
        info.series_description = facts["series_description"]
        info.modality = facts["modality"]
        info.header_read = True
        return info

    @staticmethod
    def _info(row: sqlite3.Row) -> SeriesInfo:
        return SeriesInfo(
            series_uid=row["series_uid"],
            calling_ae=row["calling_ae"] or "",
            address=row["address"] or "",
            study_date=row["study_date"] or "",
            series_description=row["series_description"] or "",
            modality=row["modality"] or "",
            header_read=bool(row["header_read"]),
        )
