"""Prometheus metrics of the node (``/metrics`` on the web page, issue 8).

Two kinds of figures:

* counters that only the SCP process sees (instances received, associations accepted and
  rejected), kept in :data:`REGISTRY` by :class:`ScpObserver`, which the node attaches to its
  SCP without touching the C-STORE handler: it wraps the ``on_stored`` callback and binds
  pynetdicom notification events (``EVT_ACCEPTED``, ``EVT_REQUESTED``, ``EVT_REJECTED``)
  on the server after the SCP's own handlers;
* figures that every process writes to disk (job states, stage durations, export attempts,
  quarantined instances), read from the job database and the folders at scrape time by
  :class:`NodeCollector`, so they are right whichever worker process did the work.

Other modules may count too: :func:`count_association_rejected` is public for checks that
refuse associations outside pynetdicom's own negotiation (e.g. an address allow-list).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from core.config import Config
from core.errors import phi_safe_message
from core.jobs import JobState
from core.logs import log_event

log = logging.getLogger("l3spot.metrics")

#: The registry ``/metrics`` exposes (the process-wide default registry is not used, so
#: tests and several nodes in one process do not collide on names).
REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter(
    "l3spot_instances_received",
    "DICOM instances stored durably in the spool (C-STORE answered 0x0000).",
    registry=REGISTRY,
)
ASSOCIATIONS_ACCEPTED = Counter(
    "l3spot_associations_accepted", "DICOM associations accepted by the SCP.", registry=REGISTRY
)
ASSOCIATIONS_REJECTED = Counter(
    "l3spot_associations_rejected",
    "DICOM associations rejected (unknown calling/called AE title, too many associations,"
    " address not allowed).",
    registry=REGISTRY,
)

#: Histogram buckets (seconds) of the job stages: queue wait, analysis, export.
STAGE_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: Job stage -> (start column, end column, extra condition) in the ``jobs`` table; the export
#: stage counts only series that had destinations (others finish it at once, in 0 s).


def count_association_rejected() -> None:
    """Count one refused association (for checks outside pynetdicom's negotiation)."""
    ASSOCIATIONS_REJECTED.inc()


OnStored = Callable[[str, str, Path], None]

#: Attribute :class:`service.scp.StoreHandler` sets on an association its policy refused.
REJECTED_MARK = "l3spot_rejected"


class ScpObserver:
    """Counts the SCP's events and records which calling AE title sent each series.

    Parameters
    ----------
    record_sender : ``(series_uid, calling_ae, address)`` -> persist the sender of a series
        (e.g. :meth:`service.web.sources.SeriesSources.record_sender`); called once per
        series and sender per process, from the association's thread.
    """

    def __init__(self, record_sender: Callable[[str, str, str], None] | None = None) -> None:
        self.record_sender = record_sender
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def wrap_on_stored(self, on_stored: OnStored) -> OnStored:
        """``on_stored`` that also counts the instance and notes the series' sender.

        pynetdicom runs the C-STORE handler (and so ``on_stored``) on the association's own
        thread, which is the :class:`pynetdicom.association.Association` object; its
        ``requestor`` holds the calling AE title and address.
        """

        def observed(study_uid: str, series_uid: str, series_dir: Path) -> None:
            on_stored(study_uid, series_uid, series_dir)
            INSTANCES_RECEIVED.inc()
            requestor = getattr(threading.current_thread(), "requestor", None)
            if requestor is None or self.record_sender is None:
                return
            calling = str(getattr(requestor, "ae_title", "") or "").strip()
            address = str(getattr(requestor, "address", "") or "")
            with self._lock:
                if self._seen.get(series_uid) == calling:
                    return
                self._seen[series_uid] = calling
                if len(self._seen) > 100_000:  # bounded memory on a long-running node
                    self._seen.clear()
            try:
                self.record_sender(series_uid, calling, address)
            except Exception as exc:  # noqa: BLE001 (bookkeeping never fails a store: SQLite
                # and PostgreSQL errors alike)
                log_event(
                    log,
                    "sender_not_recorded",
                    logging.WARNING,
                    series_instance_uid=series_uid,
                    reason=phi_safe_message(exc),
                )

        return observed

    def bind(self, server: Any) -> None:
        """Bind the association counters to a running pynetdicom server."""
        from pynetdicom import evt

        server.bind(evt.EVT_ACCEPTED, self._accepted)
        server.bind(evt.EVT_REQUESTED, self._requested)
        server.bind(evt.EVT_REJECTED, self._rejected)

    @staticmethod
    def _accepted(event: Any) -> None:
        ASSOCIATIONS_ACCEPTED.inc()

    @staticmethod
    def _requested(event: Any) -> None:
        # Runs after the SCP's own EVT_REQUESTED handler (bound first), which refuses peers
        # outside its policy with A-ASSOCIATE-RJ and marks the association (service.scp).
        if getattr(event.assoc, REJECTED_MARK, False):
            ASSOCIATIONS_REJECTED.inc()

    @staticmethod
    def _rejected(event: Any) -> None:
        # pynetdicom's own rejections (e.g. too many associations, no acceptable context)
        if not getattr(event.assoc, REJECTED_MARK, False):
            ASSOCIATIONS_REJECTED.inc()


class NodeCollector(Collector):
    """Figures read at scrape time: jobs, stage durations, exports (from the job store, SQLite
    or PostgreSQL: :meth:`core.jobs.JobStore.figures`), quarantine (from disk).

    Parameters
    ----------
    config : the job store (``jobs.database_url`` or the spool's SQLite) and the quarantine
        folder.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.quarantine = config.node.resolved_quarantine_dir()

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (see the module docstring)."""
        from core.jobs import JobStore, StoreFigures

        jobs = GaugeMetricFamily("l3spot_jobs", "Series by job state.", labels=["state"])
        stage = HistogramMetricFamily(
            "l3spot_stage_duration_seconds",
            "Seconds per job stage (queue wait, analysis, export) of the recorded jobs.",
            labels=["stage"],
        )
        exports = GaugeMetricFamily(
            "l3spot_exports",
            "Result deliveries by destination and state.",
            labels=["destination", "state"],
        )
        failures = CounterMetricFamily(
            "l3spot_export_failures",
            "Failed C-STORE delivery attempts since the last (re)start of each export.",
            labels=["destination"],
        )
        try:
            figures = JobStore.from_config(self.config).figures()
        except Exception:  # noqa: BLE001 (a scrape reports zeros rather than fail)
            figures = StoreFigures({}, {}, {}, {})
        for state in JobState:
            jobs.add_metric([str(state)], figures.states.get(str(state), 0))
        for name, values in figures.stage_seconds.items():
            buckets = [(str(le), sum(v <= le for v in values)) for le in STAGE_BUCKETS_S]
            buckets.append(("+Inf", len(values)))
            stage.add_metric([name], buckets, sum(values))
        for (dest, state), n in sorted(figures.exports.items()):
            exports.add_metric([dest, state], n)
        for dest, n in sorted(figures.export_failures.items()):
            failures.add_metric([dest], n)
        yield jobs
        yield stage
        yield exports
        yield failures
        quarantined = GaugeMetricFamily(
            "l3spot_instances_quarantined",
            "Instances the SCP refused and kept in quarantine (with a reason file).",
        )
        n_q = (
            sum(1 for _ in self.quarantine.glob("*.reason.json")) if self.quarantine.is_dir() else 0
        )
        quarantined.add_metric([], n_q)
        yield quarantined


#: Buckets (mm along z) of how far readers moved L3 when they corrected it.
CORRECTION_BUCKETS_MM = (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ReviewCollector(Collector):
    """The readers' decisions per model version (issue 17, post-market monitoring), from the
    job store's ``reviews`` (SQLite or PostgreSQL) at scrape time
    (:func:`core.review_stats.review_summary`).

    Families: ``l3spot_review_decisions{model_version, decision}`` (reviewed series:
    accepted, corrected or rejected; a correction or reject stays),
    ``l3spot_review_acceptance_ratio{model_version}``,
    ``l3spot_review_corrections_from_not_in_fov{model_version}`` (corrected series whose
    result said L3 was not in the field of view), and the histogram
    ``l3spot_review_correction_mm{model_version}`` (every correction with two positions).
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Metric]:
        """Yield the four families (empty when the store cannot be read)."""
        from core.jobs import JobStore
        from core.review_stats import DECISIONS, review_summary

        decisions = GaugeMetricFamily(
            "l3spot_review_decisions",
            "Reviewed series by model version: accepted, corrected or rejected.",
            labels=["model_version", "decision"],
        )
        ratio = GaugeMetricFamily(
            "l3spot_review_acceptance_ratio",
            "Share of reviewed series whose result the reader accepted, by model version.",
            labels=["model_version"],
        )
        misses = GaugeMetricFamily(
            "l3spot_review_corrections_from_not_in_fov",
            "Corrected series whose result said L3 was not in the field of view, by model version.",
            labels=["model_version"],
        )
        distance = HistogramMetricFamily(
            "l3spot_review_correction_mm",
            "How far readers moved L3 along z when they corrected it (mm).",
            labels=["model_version"],
        )
        try:
            summary = review_summary(JobStore.from_config(self.config).reviews())
        except Exception:  # noqa: BLE001 (a scrape never fails for lack of reviews)
            summary = {}
        for version, row in sorted(summary.items()):
            for decision in DECISIONS.values():
                decisions.add_metric([version, decision], float(row[decision]))  # type: ignore[arg-type]
            misses.add_metric([version], float(row["corrected_from_not_in_fov"]))  # type: ignore[arg-type]
            if row.get("acceptance") is not None:
                ratio.add_metric([version], float(row["acceptance"]))  # type: ignore[arg-type]
            values = list(row.get("corrections_mm") or [])  # type: ignore[call-overload]
            buckets = [(str(le), sum(v <= le for v in values)) for le in CORRECTION_BUCKETS_MM]
            buckets.append(("+Inf", len(values)))
            distance.add_metric([version], buckets, float(sum(values)))
        yield decisions
        yield ratio
        yield misses
        yield distance


def registry_for(config: Config) -> CollectorRegistry:
    """A registry with the process counters of :data:`REGISTRY` and a :class:`NodeCollector`.

    Each web application gets its own (so one process may serve several test nodes); the
    SCP counters are shared because they are process-wide.
    """
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_ProcessCounters())
    reg.register(NodeCollector(config))
    reg.register(ReviewCollector(config))
    return reg


class _ProcessCounters(Collector):
    """Re-exports the counters of :data:`REGISTRY` into another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
