"""What the pages show, assembled from the job records, ``web.sqlite`` and ``result.json``.

Kept apart from the Flask routes so the rules (newest first, filters, which numbers, no
patient identifiers unless configured) are plain functions.
"""

from __future__ import annotations

import csv
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pydantic import ValidationError

from core.config import Config
from core.jobs import JobRecord, JobState, JobStore
from core.layout import OVERVIEW_FILE, RESULT_JSON, SC_FILE, series_results_dir
from core.result import CSV_HEADER, AnalysisResult, result_csv_row
from service.web.sources import SeriesInfo, SeriesSources, read_patient_identifiers

#: Stage names of ``result.json`` ``timing_s`` in pipeline order (worker.pipeline).
PIPELINE_STAGES = ("load", "mip", "locate", "composition", "dicom_out", "total")
#: Compartments in display order, with the names radiologists use.
COMPARTMENTS = (
    ("sma", "Skeletal muscle (SMA)"),
    ("imat", "Intermuscular fat (IMAT)"),
    ("vat", "Visceral fat (VAT)"),
    ("sat", "Subcutaneous fat (SAT)"),
)


@dataclass
class JobFilter:
    """The job list's filters (empty = no filter).

    ``study_date_from``/``study_date_to`` are inclusive ``date`` bounds on the DICOM
    Study Date; series with no known study date are left out when either bound is set.
    """

    state: JobState | str = ""
    calling_ae: str = ""
    study_date_from: date | None = None
    study_date_to: date | None = None

    def matches(self, row: JobRow) -> bool:
        """True when ``row`` passes every filter that is set."""
        if self.state and row.record.state != self.state:
            return False
        if self.calling_ae and row.info.calling_ae != self.calling_ae:
            return False
        if self.study_date_from or self.study_date_to:
            d = row.study_date
            if d is None:
                return False
            if self.study_date_from and d < self.study_date_from:
                return False
            if self.study_date_to and d > self.study_date_to:
                return False
        return True


@dataclass
class JobRow:
    """One series as the pages see it."""

    record: JobRecord
    info: SeriesInfo
    result: AnalysisResult | None = None
    patient: tuple[str, str] | None = None  # (name, ID) only when configured
    has_overview: bool = False
    has_sc: bool = False

    @property
    def uid(self) -> str:
        return self.record.series_uid

    @property
    def study_date(self) -> date | None:
        """The DICOM Study Date (header, else ``result.json``) as a date, or None."""
        raw = self.info.study_date or (
            self.result.source.study_date if self.result and self.result.source else ""
        )
        return parse_da(raw)

    @property
    def series_description(self) -> str:
        if self.info.series_description:
            return self.info.series_description
        src = self.result.source if self.result else None
        return src.series_description if src else ""

    @property
    def newest_time(self) -> float:
        return self.record.received_at or self.record.updated_at or 0.0

    @property
    def l3_text(self) -> str:
        """``found``, ``not in field of view`` or "" (not analysed)."""
        if self.result is None or self.result.status != "done":
            return ""
        return "found" if self.result.l3.in_field_of_view else "not in field of view"


def parse_da(value: str) -> date | None:
    """A DICOM DA value (``YYYYMMDD``, PS3.5 Table 6.2-1) as a date; None if not one."""
    v = (value or "").strip()
    if len(v) != 8 or not v.isdigit():
        return None
    try:
        return date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None


class ResultCache:
    """``result.json`` models keyed by path and modification time (bounded, thread-safe)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[int, AnalysisResult | None]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: Path) -> AnalysisResult | None:
        """The parsed record, or None when missing or not a valid ``result.json``."""
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        with self._lock:
            hit = self._items.get(path)
            if hit is not None and hit[0] == mtime:
                self._items.move_to_end(path)
                return hit[1]
        try:
            result: AnalysisResult | None = AnalysisResult.model_validate_json(path.read_bytes())
        except (OSError, ValidationError, ValueError):
            result = None
        with self._lock:
            self._items[path] = (mtime, result)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return result


class JobViews:
    """Reads everything a page needs for one node.

    Parameters
    ----------
    config : ``node`` (spool and results folders) and ``web.show_patient_identifiers``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = JobStore.from_config(config)
        self.sources = SeriesSources(config.node.spool_dir)
        self.results_dir = config.node.resolved_results_dir()
        self.cache = ResultCache()

    def result_dir(self, series_uid: str) -> Path:
        return series_results_dir(self.results_dir, series_uid)

    def _row(self, rec: JobRecord, info: SeriesInfo | None, with_patient: bool) -> JobRow:
        series_dir = Path(rec.series_dir) if rec.series_dir else None
        info = self.sources.complete(info or SeriesInfo(rec.series_uid), series_dir)
        out = self.result_dir(rec.series_uid)
        row = JobRow(
            record=rec,
            info=info,
            result=self.cache.load(out / RESULT_JSON),
            has_overview=(out / OVERVIEW_FILE).is_file(),
            has_sc=(out / SC_FILE).is_file(),
        )
        if with_patient and self.config.web.show_patient_identifiers and series_dir:
            row.patient = read_patient_identifiers(series_dir)
        return row

    def list_jobs(self, flt: JobFilter, limit: int = 200) -> tuple[list[JobRow], int]:
        """Jobs passing ``flt``, newest received first, at most ``limit``.

        Returns
        -------
        (rows, total): the rows shown and how many passed the filter.
        """
        infos = self.sources.all()
        records = self.store.list((JobState(flt.state),) if flt.state else None)
        rows = [self._row(r, infos.get(r.series_uid), with_patient=False) for r in records]
        rows = [r for r in rows if flt.matches(r)]
        rows.sort(key=lambda r: r.newest_time, reverse=True)
        shown = rows[:limit]
        if self.config.web.show_patient_identifiers:
            for r in shown:
                if r.record.series_dir:
                    r.patient = read_patient_identifiers(Path(r.record.series_dir))
        return shown, len(rows)

    def calling_aes(self) -> list[str]:
        """Every calling AE title seen, sorted (for the filter's choices)."""
        return sorted({i.calling_ae for i in self.sources.all().values() if i.calling_ae})

    def job(self, series_uid: str) -> JobRow:
        """One series.

        Raises
        ------
        core.jobs.JobNotFoundError
            No job record for ``series_uid``.
        """
        rec = self.store.get(series_uid)
        return self._row(rec, self.sources.get(series_uid), with_patient=True)

    def measurements_csv(self) -> str:
        """Every ``result.json`` under the results folder as CSV, one row per series.

        The columns are :data:`core.result.CSV_HEADER` (those of ``l3spot analyze --csv``),
        rows ordered by Series Instance UID.
        """
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(CSV_HEADER), lineterminator="\n")
        writer.writeheader()
        if self.results_dir.is_dir():
            for folder in sorted(self.results_dir.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                result = self.cache.load(folder / RESULT_JSON)
                if result is not None:
                    writer.writerow(result_csv_row(result))
        return buf.getvalue()
