"""The Celery application: queues ``analysis`` (GPU or CPU) and ``export`` (C-STORE to PACS).

The broker comes from the configuration:

* ``broker.url: redis://host:6379/0`` for production (several worker hosts);
* ``broker.url: null``, the embedded default: kombu's filesystem transport in
  ``<var>/broker`` with a short polling interval (the default 1 s would add a second per hop,
  DESIGN.md "Known pitfalls"), no external service at all.

No result backend is needed: the job records (:mod:`worker.jobstore`) are the truth.
Tasks are acknowledged late and rejected when their worker dies, so a killed worker's task
runs again; tasks are idempotent (deterministic derived UIDs, results replaced atomically).
"""

from __future__ import annotations

from celery import Celery

from worker.config import Config, load_config

ANALYSIS_QUEUE = "analysis"
EXPORT_QUEUE = "export"
ANALYZE_TASK = "worker.tasks.analyze_series"
EXPORT_TASK = "worker.tasks.export_results"

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
        settings["broker_url"] = "filesystem://"
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
        settings["broker_transport_options"] = {
            "visibility_timeout": broker.visibility_timeout_seconds
        }
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
