"""What ``l3spot serve`` checks before it starts, and the summary it logs once it listens.

* :func:`check_folders`: every folder the node (and its embedded workers) writes can be
  created and written, else a :class:`~core.errors.StartupError` naming the key and folder.
* :func:`listen_error`: a failed bind as a :class:`~core.errors.StartupError` naming the
  address (``cannot listen on 0.0.0.0:11112 (node.host, node.port): address already in
  use``).
* :func:`log_node_started`: one ``node_started`` line (:func:`startup_summary`: config file,
  AE title and port, folders, broker, destinations, model versions), then, from a daemon
  thread so that a PACS that is down never delays the start, one ``destination_echo`` line
  per destination with its C-ECHO result.

The model versions are read from the training record next to each weights file
(``models/<name>.json``: ``git_commit``, ``started``) and the file's SHA-256, never by
loading the weights: the node process loads neither torch nor the worker
(``tests/unit/test_architecture.py``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core import __version__
from core.config import AnyDestination, Config, config_file
from core.digest import file_sha256
from core.errors import StartupError
from core.jobs import jobs_database_label
from core.logs import log_event
from core.model_registry import ModelRegistryError, active_locator
from core.queue import broker_label

log = logging.getLogger(__name__)


def _writable_folders(config: Config) -> dict[str, Path]:
    """key -> folder, for each folder the node writes (and its embedded workers write)."""
    node = config.node
    folders = {
        "node.spool_dir": node.spool_dir,
        "node.quarantine_dir": node.resolved_quarantine_dir(),
        "logging.audit_log": (
            config.logging.audit_log.parent
            if config.logging.audit_log is not None
            else node.spool_dir.parent
        ),
    }
    if config.broker.url is None:
        folders["broker.embedded_dir"] = config.broker.resolved_embedded_dir(node)
    if config.broker.starts_workers():
        folders["node.results_dir"] = node.resolved_results_dir()
    return folders


def check_folders(config: Config) -> None:
    """Create each folder the node writes and write a file in it.

    Parameters
    ----------
    config : the configuration.

    Raises
    ------
    StartupError
        A folder cannot be created or written; the message names its key and path, e.g.
        ``node.spool_dir /var/spool: cannot write: permission denied``.
    """
    for key, folder in _writable_folders(config).items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"{key} {folder}: cannot create: {_reason(exc)}") from exc
        try:
            with tempfile.TemporaryFile(dir=folder, prefix=".l3spot-write-check-"):
                pass
        except OSError as exc:
            raise StartupError(f"{key} {folder}: cannot write: {_reason(exc)}") from exc


def _reason(exc: OSError) -> str:
    """``permission denied``, ``address already in use``: the OS's words, lower case."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def listen_error(keys: str, host: str, port: int, exc: OSError) -> StartupError:
    """The error for a socket that cannot be bound.

    Parameters
    ----------
    keys : the configuration keys of the address, e.g. ``"node.host, node.port"``.
    host, port : the address.
    exc : the error of ``bind``.

    Returns
    -------
    StartupError
        ``cannot listen on <host>:<port> (<keys>): <reason>``.
    """
    return StartupError(f"cannot listen on {host}:{port} ({keys}): {_reason(exc)}")


def model_version(weights: Path) -> dict[str, Any]:
    """What identifies a weights file, read without loading it.

    Parameters
    ----------
    weights : the weights file (``.pt``); its training record is ``weights.with_suffix(".json")``.

    Returns
    -------
    dict
        ``file`` (name), ``sha256`` (first 12 hex digits of the file's SHA-256), and from the
        training record when there is one: ``git_commit`` (12 digits) and ``trained`` (the
        training's start, UTC); ``missing: true`` when the file does not exist.
    """
    info: dict[str, Any] = {"file": weights.name}
    try:
        info["sha256"] = file_sha256(weights)[:12]
    except OSError:
        info["missing"] = True
        return info
    try:
        record = json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return info
    if isinstance(record, dict):
        if record.get("git_commit"):
            info["git_commit"] = str(record["git_commit"])[:12]
        if record.get("started"):
            info["trained"] = str(record["started"])
    return info


def model_versions(config: Config) -> dict[str, Any]:
    """:func:`model_version` of each model the analysis uses, by role.

    The locator's are those of the active version (:func:`core.model_registry.active_locator`:
    the site's promoted one, else the configured weights), with its name as ``version``.

    Returns
    -------
    dict
        ``locator`` (first stage), ``refine`` (second stage, absent when the version has
        none), ``composition`` (``method``, and the U-Net's version when the method is
        ``unet``). When the active site version's weights are missing, ``locator`` says so
        (``missing: true`` and the reason): every analysis will fail with that reason.
    """
    try:
        locator, label = active_locator(config)
    except ModelRegistryError as exc:
        models: dict[str, Any] = {"locator": {"missing": True, "reason": str(exc)}}
    else:
        models = {"locator": {**model_version(locator.weights), "version": label}}
        if locator.refine_weights is not None:
            models["refine"] = {**model_version(locator.refine_weights), "version": label}
    composition: dict[str, Any] = {"method": config.composition.method}
    if config.composition.method == "unet":
        composition.update(model_version(config.composition.unet_weights))
    models["composition"] = composition
    return models


def startup_summary(
    config: Config,
    config_path: Path | None = None,
    port: int | None = None,
    web_url: str | None = None,
) -> dict[str, Any]:
    """The fields of the ``node_started`` line.

    Parameters
    ----------
    config : the configuration.
    config_path : the file it came from (None: ``$L3SPOT_CONFIG`` or ``./config.yaml`` if
        present, else the built-in defaults).
    port : the port the SCP listens on (differs from ``node.port`` when that is 0).
    web_url : the operators' page, or None when it is off.

    Returns
    -------
    dict
        ``version``, ``config_file`` (absolute, or "built-in defaults"), ``ae_title``,
        ``host``, ``port``, ``tls``, ``spool_dir``, ``results_dir``, ``broker`` ("embedded"
        or the URL with its password masked), ``jobs`` (the job store: ``sqlite:<path>``, or
        the PostgreSQL URL with its password masked), ``embedded_workers``, ``web``,
        ``destinations`` (``AE@host:port``), ``models`` (:func:`model_versions`).
    """
    node = config.node
    source = config_path.resolve() if config_path is not None else config_file()
    return {
        "version": __version__,
        "config_file": str(source) if source is not None else "built-in defaults",
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port if port is None else port,
        "tls": config.security.tls_enabled,
        "spool_dir": str(node.spool_dir.resolve()),
        "results_dir": str(node.resolved_results_dir().resolve()),
        "broker": broker_label(config),
        "jobs": jobs_database_label(config),
        "embedded_workers": config.broker.starts_workers(),
        "web": web_url,
        "destinations": [d.label for d in config.export.destinations],
        "models": model_versions(config),
    }


def _echo_destination(
    dest: AnyDestination, calling_ae_title: str, timeout_s: float
) -> dict[str, Any]:
    """Check one destination with :func:`core.echo.probe_destination` (C-ECHO, or QIDO-RS
    for a DICOMweb service); never raises.

    Returns
    -------
    dict
        ``ok``, ``check`` (``C-ECHO`` or ``QIDO-RS``), ``status`` (``0x0000`` style, the HTTP
        status code for QIDO-RS, or None without a response), ``error`` (the outcome and why,
        or None) and ``seconds``.
    """
    from core.echo import EchoOutcome, probe_destination

    started = time.monotonic()
    res = probe_destination(dest, calling_ae_title, timeout_s)
    error = None
    if not res.ok:
        error = (
            "cannot connect: connection refused"
            if res.outcome is EchoOutcome.REFUSED
            else f"{res.outcome}: {res.detail}"
        )
    status: str | int | None = res.status
    if res.status is not None and res.check == "C-ECHO":
        status = f"0x{res.status:04X}"
    return {
        "ok": res.ok,
        "check": res.check,
        "status": status,
        "error": error,
        "seconds": round(time.monotonic() - started, 3),
    }


def _echo_all(config: Config) -> None:
    calling = config.export_calling_ae_title()
    timeout_s = config.logging.startup_echo_timeout_seconds
    for dest in config.export.destinations:
        result = _echo_destination(dest, calling, timeout_s)
        log_event(
            log,
            "destination_echo",
            logging.INFO if result["ok"] else logging.WARNING,
            destination=dest.label,
            **result,
        )


def log_node_started(
    config: Config,
    config_path: Path | None = None,
    port: int | None = None,
    web_url: str | None = None,
) -> threading.Thread | None:
    """Log ``node_started`` (:func:`startup_summary`), then C-ECHO the destinations.

    Parameters
    ----------
    config, config_path, port, web_url : as in :func:`startup_summary`.

    Returns
    -------
    threading.Thread or None
        The daemon thread that logs one ``destination_echo`` per destination (WARNING when
        it does not answer), or None when there is no destination or
        ``logging.startup_echo_timeout_seconds`` is 0.
    """
    log_event(log, "node_started", **startup_summary(config, config_path, port, web_url))
    if not config.export.destinations or config.logging.startup_echo_timeout_seconds <= 0:
        return None
    thread = threading.Thread(target=_echo_all, args=(config,), name="startup-echo", daemon=True)
    thread.start()
    return thread
