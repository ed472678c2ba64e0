"""The Celery application: queues ``analysis`` (GPU or CPU) and ``export`` (C-STORE to PACS).

The broker comes from the configuration:

* ``broker.url: redis://host:6379/0`` for production (several worker hosts);
* ``broker.url: null``, the embedded default: kombu's filesystem transport in
  ``<var>/broker`` with a short polling interval (the default 1 s would add a second per hop,
  DESIGN.md "Known pitfalls"), no external service at all.

No result backend is needed: the job records (:mod:`core.jobs`) are the truth.
Tasks are acknowledged late and rejected when their worker dies, so a killed worker's task
runs again; tasks are idempotent (deterministic derived UIDs, results replaced atomically).

What happens to the task of a worker killed with SIGKILL depends on the transport:

* a killed pool child (the task's process): the worker's main process rejects the message
  with requeue (``task_reject_on_worker_lost``), on both transports;
* the whole worker (main process; its pool children follow by ``PR_SET_PDEATHSIG``): Redis
  delivers the unacknowledged message again after ``broker.visibility_timeout_seconds``;
  the filesystem transport removed the message file when it was fetched, so the message is
  gone. In both cases the node's reconciliation (:meth:`service.node.Node.reconcile`)
  queues the series again once its job record shows no heartbeat for
  ``broker.stale_running_seconds``; tokens make whichever copy comes second a no-op.
"""

from __future__ import annotations

import re
from pathlib import Path

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from core.config import Config, load_config

ANALYSIS_QUEUE = "analysis"
EXPORT_QUEUE = "export"
ANALYZE_TASK = "worker.tasks.analyze_series"
EXPORT_TASK = "worker.tasks.export_results"
REMEASURE_TASK = "worker.tasks.remeasure_series"

app = Celery("l3spot", include=["worker.tasks"])
_config: Config | None = None


def celery_settings(config: Config) -> dict[str, object]:
    """Celery settings for a configuration (broker, routes, reliability options).

    Creates the embedded broker folders when ``broker.url`` is null.
    """
    broker = config.broker
    settings: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": ANALYSIS_QUEUE,
        "task_routes": {
            ANALYZE_TASK: {"queue": ANALYSIS_QUEUE},
            EXPORT_TASK: {"queue": EXPORT_QUEUE},
            REMEASURE_TASK: {"queue": ANALYSIS_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": broker.result_backend,
        "task_ignore_result": broker.result_backend is None,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": False,
        "worker_enable_remote_control": broker.url is not None,
    }
    if broker.url is None:
        root = broker.resolved_embedded_dir(config.node).resolve()
        queue, processed, control = root / "queue", root / "processed", root / "control"
        for folder in (queue, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        # the host named: kombu warns "No hostname was supplied" at each connection otherwise
        settings["broker_url"] = "filesystem://localhost//"
        settings["broker_transport_options"] = {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
            "polling_interval": broker.embedded_polling_interval_seconds,
        }
    else:
        settings["broker_url"] = broker.url
        vt = broker.visibility_timeout_seconds
        settings["broker_transport_options"] = {
            "visibility_timeout": vt,
            # sweep for unacknowledged messages of dead workers often enough for the
            # visibility timeout to mean what it says (kombu: interval x throttle seconds)
            "unacked_restore_interval": max(1, min(10, vt // 2)),
            "unacked_restore_throttle": 1,
            "socket_timeout": broker.socket_timeout_seconds,
            "socket_connect_timeout": broker.socket_timeout_seconds,
            "health_check_interval": 10,
        }
        settings["broker_connection_max_retries"] = None  # a restarted Redis: keep trying
    return settings


def configure_app(config: Config) -> Celery:
    """Point the shared :data:`app` at the configured broker and remember the config."""
    global _config
    _config = config
    app.conf.update(celery_settings(config))
    return app


def current_config() -> Config:
    """The configuration the app was configured with (else loaded from the environment)."""
    global _config
    if _config is None:
        configure_app(load_config())
    assert _config is not None
    return _config


def broker_label(config: Config) -> str:
    """The broker for logs and pages: ``"embedded"``, or its URL with any password masked.

    A failover list (``url1;url2``) is masked part by part; a URL kombu cannot parse loses
    everything between ``//`` and ``@``.
    """
    url = config.broker.url
    if url is None:
        return "embedded"
    parts = []
    for part in url.split(";"):
        try:
            parts.append(maybe_sanitize_url(part))
        except ValueError:
            parts.append(re.sub(r"//[^/@]*@", "//**@", part))
    return ";".join(parts)


def send_analysis(celery: Celery, series_dir: Path, token: str | None) -> None:
    """Send ``worker.tasks.analyze_series(series_dir, token=...)`` to queue ``analysis``.

    The only place an analysis task is sent (the node's watcher and reconciliation,
    ``l3spot retry``, the web page's retry button all come here).
    """
    celery.send_task(
        ANALYZE_TASK,
        args=[str(Path(series_dir).resolve())],
        kwargs={"token": token},
        queue=ANALYSIS_QUEUE,
    )


def send_export(celery: Celery, series_uid: str, token: str | None) -> None:
    """Send ``worker.tasks.export_results(series_uid, token=...)`` to queue ``export``.

    The only place an export task is sent (a finished analysis, the node, ``l3spot retry``).
    """
    celery.send_task(EXPORT_TASK, args=[series_uid], kwargs={"token": token}, queue=EXPORT_QUEUE)


def send_remeasure(
    celery: Celery, series_dir: Path, token: str | None, review_id: int, slice_index: int
) -> None:
    """Send ``worker.tasks.remeasure_series(series_dir, review_id, slice_index, token=...)``
    to queue ``analysis``: measure again at the slice a reader chose as L3 (issue 17).

    The only place a re-measure task is sent (the web page's "Use this slice as L3").

    Parameters
    ----------
    series_dir : ``<spool>/<StudyUID>/<SeriesUID>``.
    token : the job's queue token (a stale copy of the task does nothing).
    review_id : the ``reviews`` row (:meth:`core.jobs.JobStore.add_review`) that asked for it.
    slice_index : the chosen L3 slice, 0-based in the series sorted by ascending z.
    """
    celery.send_task(
        REMEASURE_TASK,
        args=[str(Path(series_dir).resolve()), int(review_id), int(slice_index)],
        kwargs={"token": token},
        queue=ANALYSIS_QUEUE,
    )
