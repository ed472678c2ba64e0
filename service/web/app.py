"""The operators' web application (Flask, plain Jinja2 templates, no front-end build).

Routes
------
``GET /``                        job list, newest first; filters ``state``, ``calling_ae``,
                                 ``study_date_from``/``study_date_to`` (``YYYY-MM-DD``)
``GET /jobs/<uid>``              one series: pictures, numbers, timings, exports, retry
``GET /jobs/<uid>/overview.png`` the results folder's ``overview.png`` (MIP, L3 line, curves)
``GET /jobs/<uid>/l3.png``       the Secondary Capture (``sc.dcm``) decoded to PNG
``POST /jobs/<uid>/retry``       re-queue as ``l3spot retry`` (CSRF token + same origin)
``GET /jobs/<uid>/slices/<i>.png`` slice ``i`` (0-based, ascending z) of the spooled CT,
                                 ``?window=soft|bone|lung``, ``&masks=1`` colours the
                                 compartments of the SEG on the L3 slice (docs/review.md)
``POST /jobs/<uid>/review``      the reader accepts the result (``action=accept``),
                                 chooses slice ``slice`` as L3 (``action=correct``: a
                                 re-measure task is queued; also for a result "L3 not in
                                 the field of view") or says no slice is L3
                                 (``action=reject``: recorded, nothing re-measured or
                                 sent); CSRF token + same origin
``GET /destinations``            each export destination: last success, last failure and
                                 why, series waiting, newest C-ECHO result
``POST /destinations/<i>/echo``  C-ECHO destination ``i`` now, QIDO-RS if it is DICOMweb (CSRF
                                 token + same origin);
                                 303 to ``/destinations?echoed=<i>`` showing the outcome
                                 (success, association rejected, connection refused,
                                 timeout, ...) and the round-trip time
``GET /measurements.csv``        every result, the columns of ``l3spot analyze --csv``
``GET /reviews.csv``             every reader's decision: accept/correct/reject, who, when, slices,
                                 correction distance (mm), model version (issue 17)
                                 (text cells that a spreadsheet would run as a formula
                                 are escaped: :func:`core.result.csv_safe`)
``GET /livez``                   liveness, JSON: 200 while the SCP serves, else 503
``GET /readyz``                  readiness, JSON: 503 when the SCP, broker, workers or disk
                                 fail; 200 ``degraded`` when a destination fails C-ECHO
``GET /healthz``                 JSON, 200 or 503: the readiness checks without the
                                 destinations (as before ``/readyz``, for existing monitors)
``GET /metrics``                 Prometheus text format

The three health routes need no token (they hold no patient data).

Access (:mod:`service.web.auth`, ``web.auth``): with authentication configured every other
route needs a signed-in user: ``web.token`` as a bearer token (or, in ``token`` mode, as the
HTTP Basic password), a named user's HTTP Basic name and password (``users``), or a trusted
reverse proxy's user header (``proxy``). Reading needs any role; retry and C-ECHO need
``administrator``. :func:`check_web_config` refuses a listen address other than loopback
without authentication.

Host check (DNS rebinding): every route answers 400 unless the request's ``Host`` names
an allowed host (:func:`allowed_hosts`: the loopback names, ``web.host`` when it is one
address, ``web.allowed_hosts``; any port). The health routes also accept any IP address
as ``Host`` (probes address the node by IP; a rebinding page always sends its own name).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import logging
import secrets
import threading
import time
from collections import OrderedDict
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pydicom
from flask import Flask, Response, abort, redirect, render_template, request, send_file, url_for
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.config import Config, WebConfig
from core.echo import check_name
from core.errors import L3SpotError
from core.jobs import CORRECTED_NOTE, JobNotFoundError, JobState, ReviewAction
from core.labels import COMPARTMENT_COLOURS
from core.labels import COMPARTMENTS as COMPARTMENT_KEYS
from core.layout import OVERVIEW_FILE, SC_FILE, SEG_FILE
from core.logs import log_event
from service.audit import AuditLog, audit_log_path
from service.metrics import registry_for
from service.requeue import RETRY_ERRORS, RetryError, requeue_series
from service.spool import is_valid_uid
from service.users import Role
from service.web.auth import (
    EXTENSION_KEY,
    Authenticator,
    LoginThrottledError,
    ProxyRefusedError,
    current_user,
    refusal,
    require,
    signed_in_name,
)
from service.web.health import DestinationMonitor, NodeProbe, health, liveness, readiness
from service.web.review import (
    WINDOWS,
    ReviewError,
    SliceIndex,
    check_l3_index,
    read_hu,
    render_slice,
    seg_labels,
)
from service.web.trajectory import Trajectory, trajectory
from service.web.views import (
    COMPARTMENTS,
    PIPELINE_STAGES,
    JobFilter,
    JobViews,
)

log = logging.getLogger(__name__)

#: Most job rows one page shows.
MAX_ROWS = 1000
#: Names of loopback that every page answers to as ``Host`` (with any port).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Routes that also answer to any IP address as ``Host`` (health probes).
HEALTH_ENDPOINTS = frozenset({"healthz", "livez", "readyz"})
#: A refused ``Host`` is logged at most once per name in this many seconds.
HOST_LOG_INTERVAL_S = 60.0


class WebConfigError(L3SpotError, ValueError):
    """The ``web`` section would expose the page unprotected."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_web_config(web: WebConfig) -> None:
    """Refuse to serve without protection on anything but loopback.

    Raises
    ------
    WebConfigError
        ``web.host`` is not a loopback address and no authentication is configured
        (``web.auth: token`` with an empty ``web.token``), or ``web.auth: proxy`` without
        ``web.trusted_proxies`` or ``web.proxy_user_header``.
    """
    if web.auth == "proxy" and not (web.trusted_proxies and web.proxy_user_header.strip()):
        raise WebConfigError(
            "web.auth is proxy: set web.trusted_proxies (the reverse proxies' addresses) and"
            " web.proxy_user_header"
        )
    if web.auth == "token" and not is_loopback(web.host) and not (web.token or "").strip():
        raise WebConfigError(
            f"web.host {web.host!r} is not loopback: set web.token (bearer token / Basic"
            " password) or web.auth (users, proxy), or bind web.host to 127.0.0.1"
        )


def allowed_hosts(web: WebConfig) -> frozenset[str] | None:
    """The host names the page answers to as ``Host``; None = any (``"*"`` configured).

    The loopback names (:data:`LOOPBACK_HOSTS`), ``web.host`` when it is one address (not a
    wildcard such as ``0.0.0.0``), and ``web.allowed_hosts``; lower case, IPv6 without
    brackets. An entry with a leading dot stands for its subdomains.
    """
    extra = [h.strip("[]") for h in web.allowed_hosts]
    if "*" in extra:
        return None
    names = set(LOOPBACK_HOSTS) | set(extra)
    bind = web.host.strip().strip("[]").lower()
    if bind not in ("", "0.0.0.0", "::"):
        names.add(bind)
    return frozenset(names)


def host_name(host: str) -> str:
    """The name part of a ``Host`` value (``host[:port]``, ``[v6][:port]``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.partition(":")[0].rstrip(".")


def host_allowed(host: str, allowed: frozenset[str] | None, any_ip: bool = False) -> bool:
    """True when ``Host`` value ``host`` names an allowed host (see :func:`allowed_hosts`).

    Parameters
    ----------
    host : the request's ``Host`` (``request.host``; "" when missing or malformed).
    allowed : :func:`allowed_hosts`; None allows every host.
    any_ip : also allow any IP address (the health routes).
    """
    if allowed is None:
        return True
    name = host_name(host)
    if not name:
        return False
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None and (any_ip or ip.is_loopback):
        return True
    return name in allowed or any(
        a.startswith(".") and name.endswith(a) and len(name) > len(a) for a in allowed
    )


class _HostLog:
    """Refused ``Host`` names, logged at most once per :data:`HOST_LOG_INTERVAL_S` each."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._last: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def refused(self, host: str, path: str, remote: str | None) -> None:
        now = time.monotonic()
        key = host[:100]
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < HOST_LOG_INTERVAL_S:
                return
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.size:
                self._last.popitem(last=False)
        log_event(
            log,
            "web_host_refused",
            logging.WARNING,
            host=key,
            path=path[:200],
            remote_address=remote,
            hint="not a name of this page: add it to web.allowed_hosts if it is",
        )


def _same_origin() -> bool:
    """The request's Origin (else Referer), when sent, names this host (CSRF defence)."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source:
        return True  # not sent (some clients): the CSRF token alone decides
    if source == "null":
        return False  # sandboxed or cross-origin redirect context
    return urlsplit(source).netloc == request.host


class _PngCache:
    """PNG bytes of decoded ``sc.dcm`` files keyed by path and modification time."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, path: Path) -> bytes:
        """PNG of a Secondary Capture's pixels (RGB or MONOCHROME2, 8 bit).

        Raises
        ------
        OSError
            The file cannot be read.
        """
        mtime = path.stat().st_mtime_ns
        with self._lock:
            hit = self._items.get(path)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
        if pixels.dtype != np.uint8:
            lo, hi = float(pixels.min()), float(pixels.max())
            pixels = ((pixels - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        data = buf.getvalue()
        with self._lock:
            self._items[path] = (mtime, data)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data


def _parse_date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _fmt_da(d: date | None) -> str:
    return d.isoformat() if d else ""


def create_app(
    config: Config,
    probe: NodeProbe | None = None,
    celery: Any | None = None,
    monitor: DestinationMonitor | None = None,
) -> Flask:
    """The web application of one node.

    Parameters
    ----------
    config : the node's configuration (``node`` folders, ``export``, ``web``).
    probe : the running node's self-report for the health routes (None: TCP connect to the
        SCP).
    celery : the configured Celery app for retries (None: configured from ``config`` on the
        first retry).
    monitor : the destinations' C-ECHO results (None: one for ``config``).

    Raises
    ------
    WebConfigError
        See :func:`check_web_config`.
    """
    check_web_config(config.web)
    here = Path(__file__).resolve().parent
    app = Flask(
        "l3spot.web",
        template_folder=str(here / "templates"),
        static_folder=str(here / "static"),
    )
    views = JobViews(config)
    registry = registry_for(config)
    pngs = _PngCache()
    csrf_key = secrets.token_bytes(32)
    state: dict[str, Any] = {"celery": celery}
    hosts = allowed_hosts(config.web)
    host_log = _HostLog()
    monitor = monitor or DestinationMonitor(config)
    slice_index = SliceIndex()
    audit = AuditLog(audit_log_path(config))

    auth = Authenticator(config.web, views.store, AuditLog(audit_log_path(config)))
    app.extensions[EXTENSION_KEY] = auth

    app.jinja_env.filters.update(time=_fmt_time, num=_fmt_num, da=_fmt_da)
    app.jinja_env.globals.update(
        ae_title=config.node.ae_title,
        show_patient=config.web.show_patient_identifiers,
        states=tuple(JobState),
        compartments=COMPARTMENTS,
        pipeline_stages=PIPELINE_STAGES,
        colours={COMPARTMENT_KEYS[k]: f"rgb{c}" for k, c in COMPARTMENT_COLOURS.items()},
    )

    def _csrf(purpose: str) -> str:
        return hmac.new(csrf_key, purpose.encode(), hashlib.sha256).hexdigest()

    def csrf_token(series_uid: str) -> str:
        """The retry form's token, bound to one series."""
        return _csrf(f"retry:{series_uid}")

    def echo_csrf_token(label: str) -> str:
        """The C-ECHO button's token, bound to one destination."""
        return _csrf(f"echo:{label}")

    def review_csrf_token(series_uid: str) -> str:
        """The review form's token, bound to one series."""
        return _csrf(f"review:{series_uid}")

    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["review_csrf_token"] = review_csrf_token
    app.jinja_env.globals["windows"] = tuple(WINDOWS)
    app.jinja_env.globals["echo_csrf_token"] = echo_csrf_token

    def _csrf_ok(expected: str) -> bool:
        return _same_origin() and hmac.compare_digest(request.form.get("csrf", ""), expected)

    @app.before_request
    def _check_host() -> Response | None:
        # first: a page reached under a foreign name (DNS rebinding) gets nothing, not even
        # the token challenge
        if host_allowed(request.host, hosts, any_ip=request.endpoint in HEALTH_ENDPOINTS):
            return None
        host_log.refused(request.headers.get("Host", ""), request.path, request.remote_addr)
        return Response(
            "Host not allowed: this page does not answer to that name (web.allowed_hosts)\n",
            400,
            mimetype="text/plain",
        )

    @app.before_request
    def _require_user() -> Response | None:
        # every page but health and static files needs a signed-in user (any role) when
        # authentication is configured; actions add their role (require)
        if request.endpoint in (*HEALTH_ENDPOINTS, "static"):
            return None
        return refusal(request, Role.READER)

    @app.context_processor
    def _user() -> dict[str, Any]:
        try:
            user = current_user(request) if auth.enabled else None
        except (ProxyRefusedError, LoginThrottledError):
            user = None
        return {
            "user": user,
            "is_administrator": not auth.enabled
            or (user is not None and user.allows(Role.ADMINISTRATOR)),
        }

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def _uid_or_404(series_uid: str) -> str:
        if not is_valid_uid(series_uid):
            abort(404)
        return series_uid

    @app.get("/")
    def jobs() -> str:
        flt = JobFilter(
            state=request.args.get("state", "")
            if request.args.get("state") in tuple(JobState)
            else "",
            calling_ae=request.args.get("calling_ae", "").strip(),
            study_date_from=_parse_date(request.args.get("study_date_from")),
            study_date_to=_parse_date(request.args.get("study_date_to")),
        )
        limit = min(max(request.args.get("limit", 200, type=int) or 200, 1), MAX_ROWS)
        rows, total = views.list_jobs(flt, limit)
        return render_template(
            "jobs.html", rows=rows, total=total, flt=flt, calling_aes=views.calling_aes()
        )

    @app.get("/jobs/<series_uid>")
    def job(series_uid: str) -> str:
        try:
            row = views.job(_uid_or_404(series_uid))
        except JobNotFoundError:
            abort(404)
        will_export = bool(
            row.record.analysis_finished_at is not None
            and row.result is not None
            and config.export.destinations
        )
        reviews = views.store.reviews(row.record.series_uid)
        return render_template(
            "job.html",
            row=row,
            rec=row.record,
            result=row.result,
            trajectory=_trajectory(row.record.series_uid),
            will_export=will_export,
            n_destinations=len(config.export.destinations),
            requeued=request.args.get("requeued", ""),
            error=RETRY_ERRORS.get(request.args.get("error", ""), ""),
            viewer=_viewer(row),
            reviews=reviews,
            corrected_by=_corrected_by(row.record, reviews),
            reviewed=request.args.get("reviewed", ""),
            review_error=request.args.get("review_error", "")[:200],
        )

    def _trajectory(series_uid: str) -> Trajectory | None:
        """SMA and SMI of this job's patient over time (two or more measured studies)."""
        this = views.store.measurement(series_uid)
        if this is None:
            return None
        rows = views.store.patient_measurements(this.patient_key)
        return trajectory(rows, series_uid, config.web.show_patient_identifiers)

    def _corrected_by(rec: Any, reviews: list[Any]) -> Any:
        """The review whose correction the shown result is, or None (the locator's L3)."""
        if not (rec.note or "").startswith(CORRECTED_NOTE):
            return None  # a new analysis clears the note: its L3 is the locator's
        return next((r for r in reversed(reviews) if r.action == ReviewAction.CORRECT), None)

    def _l3(row: Any) -> tuple[int | None, str | None, float | None]:
        result = row.result
        if result is None or result.status != "done" or not result.l3.in_field_of_view:
            return None, None, None
        return result.l3.slice_index, result.l3.sop_instance_uid, result.l3.z_mm

    def _missed(row: Any) -> bool:
        """The result is done and says L3 is not in the field of view (a reader may still
        find it)."""
        result = row.result
        return bool(
            result is not None and result.status == "done" and not result.l3.in_field_of_view
        )

    def _viewer(row: Any) -> dict[str, Any] | None:
        """What the slice viewer shows, or None (nothing to review): the slices around L3;
        for a result without L3 the whole series, centred on its middle slice."""
        l3_index, _sop, _z = _l3(row)
        missed = _missed(row)
        if (l3_index is None and not missed) or not row.record.series_dir:
            return None
        slices = slice_index.slices(Path(row.record.series_dir))
        if not slices or (l3_index is not None and l3_index >= len(slices)):
            return None
        first, last = choosable(l3_index, len(slices))
        return {
            "l3": l3_index,
            "start": len(slices) // 2 if l3_index is None else l3_index,
            "first": first,
            "last": last,
            "z_mm": [round(s.z_mm, 2) for s in slices],
        }

    def choosable(l3_index: int | None, n_slices: int) -> tuple[int, int]:
        """First and last slice a reader may choose as L3: ``web.review_slices_around_l3``
        on each side of L3, or every slice when the result has none."""
        if l3_index is None:
            return 0, n_slices - 1
        around = config.web.review_slices_around_l3
        return max(0, l3_index - around), min(n_slices - 1, l3_index + around)

    @app.get("/jobs/<series_uid>/overview.png")
    def overview_png(series_uid: str) -> Response:
        path = views.result_dir(_uid_or_404(series_uid)) / OVERVIEW_FILE
        if not path.is_file():
            abort(404)
        return send_file(path, mimetype="image/png", max_age=0)

    @app.get("/jobs/<series_uid>/l3.png")
    def l3_png(series_uid: str) -> Response:
        path = views.result_dir(_uid_or_404(series_uid)) / SC_FILE
        if not path.is_file():
            abort(404)
        try:
            data = pngs.png(path)
        except (OSError, ValueError, AttributeError):
            abort(404)
        return Response(data, mimetype="image/png")

    @app.get("/jobs/<series_uid>/slices/<int:index>.png")
    def slice_png(series_uid: str, index: int) -> Response:
        try:
            rec = views.store.get(_uid_or_404(series_uid))
        except JobNotFoundError:
            abort(404)
        slices = slice_index.slices(Path(rec.series_dir)) if rec.series_dir else []
        if not 0 <= index < len(slices):
            abort(404)
        window = WINDOWS.get(request.args.get("window", "soft"), WINDOWS["soft"])
        labels = None
        if request.args.get("masks") == "1":
            row = views.job(series_uid)
            l3_index, _sop, _z = _l3(row)
            # the SEG holds the masks of the L3 slice only
            if l3_index == index:
                labels = seg_labels(views.result_dir(series_uid) / SEG_FILE)
        try:
            data = render_slice(read_hu(slices[index].path), window, labels)
        except (OSError, ValueError, AttributeError):
            abort(404)
        return Response(data, mimetype="image/png")

    @app.post("/jobs/<series_uid>/review")
    @require(Role.READER)
    def review(series_uid: str) -> Response:
        uid = _uid_or_404(series_uid)
        if not _csrf_ok(review_csrf_token(uid)):
            abort(403)
        try:
            row = views.job(uid)
        except JobNotFoundError:
            abort(404)
        try:
            action = ReviewAction(request.form.get("action", ""))
        except ValueError:
            abort(400)
        l3_index, l3_sop, l3_z = _l3(row)
        rec = row.record

        def refused(reason: str) -> Response:
            return redirect(url_for("job", series_uid=uid, review_error=reason), code=303)

        if l3_index is None and not _missed(row):
            return refused("no result to review")
        if rec.state in ("received", "queued", "analysing"):
            return refused("the series is being analysed: review its new result")
        slices = slice_index.slices(Path(rec.series_dir)) if rec.series_dir else []
        if not slices:
            return refused("the received images are no longer in the spool")
        try:
            check_l3_index(uid, slices, l3_index, l3_sop)
        except ReviewError as exc:
            return refused(exc.reason)
        chosen: int | None = l3_index  # accept: the result's L3 (None: "not in the FOV")
        if action == ReviewAction.REJECT:
            if l3_index is None:
                return refused("l3spot located no L3 to reject")
            chosen = None
        elif action == ReviewAction.CORRECT:
            chosen = request.form.get("slice", type=int)
            first, last = choosable(l3_index, len(slices))
            if chosen is None or not first <= chosen <= last:
                return refused("the chosen slice is not one the viewer shows")
            if chosen == l3_index:
                action = ReviewAction.ACCEPT  # the same slice: an acceptance
        user = signed_in_name(request)
        # the locator version of the result reviewed (issue 17: decisions per model version);
        # results from before the site's versions existed name l3spot's version
        version = (
            (row.result.algorithm.locator_model or row.result.algorithm.version)
            if row.result is not None
            else None
        )
        picked = None if chosen is None else slices[chosen]
        review_rec = views.store.add_review(
            uid,
            action,
            user,
            slice_index=chosen,
            z_mm=None if picked is None else picked.z_mm,
            sop_instance_uid=None if picked is None else picked.sop_instance_uid,
            previous_slice_index=l3_index,
            previous_z_mm=l3_z,
            model_version=version,
        )
        audit.record(
            event="review",
            series_instance_uid=uid,
            study_instance_uid=rec.study_uid,
            review_id=review_rec.id,
            review_action=str(action),
            user=user,
            slice_index=chosen,
            previous_slice_index=l3_index,
            model_version=version,
        )
        log_event(
            log,
            "review_recorded",
            series_instance_uid=uid,
            review_id=review_rec.id,
            action=str(action),
            slice_index=chosen,
            previous_slice_index=l3_index,
        )
        if action == ReviewAction.CORRECT and chosen is not None:
            if state["celery"] is None:
                from core.queue import configure_app

                state["celery"] = configure_app(config)
            from core.queue import send_remeasure

            token = views.store.mark_queued(uid)
            send_remeasure(state["celery"], Path(rec.series_dir), token, review_rec.id, chosen)
        return redirect(url_for("job", series_uid=uid, reviewed=str(action)), code=303)

    @app.post("/jobs/<series_uid>/retry")
    @require(Role.ADMINISTRATOR)
    def retry(series_uid: str) -> Response:
        uid = _uid_or_404(series_uid)
        if not _csrf_ok(csrf_token(uid)):
            abort(403)
        if state["celery"] is None:
            from core.queue import configure_app

            state["celery"] = configure_app(config)
        try:
            what = requeue_series(
                config,
                views.store,
                state["celery"],
                uid,
                analysis=bool(request.form.get("analysis")),
            )
        except RetryError as exc:
            return redirect(url_for("job", series_uid=uid, error=exc.code), code=303)
        return redirect(url_for("job", series_uid=uid, requeued=what), code=303)

    @app.get("/destinations")
    def destinations() -> str:
        echoes = monitor.snapshot()
        dests = config.export.destinations
        configured = [d.label for d in dests]
        summaries = {r.label: r for r in views.store.destination_states(configured)}
        rows = [
            {
                "index": i,
                "label": label,
                "summary": summaries.get(label),
                "echo": echoes.get(label),
                "check": check_name(dest),
            }
            for i, (label, dest) in enumerate(zip(configured, dests, strict=True))
        ]
        former = [s for label, s in summaries.items() if label not in configured]
        echoed = request.args.get("echoed", type=int)
        shown = rows[echoed] if echoed is not None and 0 <= echoed < len(rows) else None
        return render_template(
            "destinations.html",
            rows=rows,
            former=former,
            echoed=shown,
            echo_interval=config.web.destination_echo_interval_seconds,
        )

    @app.post("/destinations/<int:index>/echo")
    @require(Role.ADMINISTRATOR)
    def echo_destination(index: int) -> Response:
        if not 0 <= index < len(config.export.destinations):
            abort(404)
        dest = config.export.destinations[index]
        if not _csrf_ok(echo_csrf_token(dest.label)):
            abort(403)
        result = monitor.check(index)
        log_event(
            log,
            "destination_echo",
            destination=dest.label,
            outcome=str(result.outcome),
            detail=result.detail,
            rtt_ms=None if result.rtt_ms is None else round(result.rtt_ms, 1),
            source="web",
        )
        return redirect(url_for("destinations", echoed=index, _anchor=f"dest-{index}"), code=303)

    @app.get("/reviews.csv")
    def reviews_csv() -> Response:
        """Every reader's decision (issue 17): the post-market monitoring export."""
        from core.review_stats import review_csv

        return Response(
            review_csv(views.store.reviews()),
            mimetype="text/csv",
            headers={"Content-Disposition": 'attachment; filename="l3spot-reviews.csv"'},
        )

    @app.get("/measurements.csv")
    def measurements_csv() -> Response:
        return Response(
            views.measurements_csv(),
            mimetype="text/csv",
            headers={"Content-Disposition": 'attachment; filename="l3spot-measurements.csv"'},
        )

    @app.get("/healthz")
    def healthz() -> Response:
        body, status = health(config, probe, state["celery"])
        resp = app.json.response(body)
        resp.status_code = status
        return resp

    @app.get("/livez")
    def livez() -> Response:
        body, status = liveness(config, probe)
        resp = app.json.response(body)
        resp.status_code = status
        return resp

    @app.get("/readyz")
    def readyz() -> Response:
        body, status = readiness(config, probe, state["celery"], monitor)
        resp = app.json.response(body)
        resp.status_code = status
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.errorhandler(403)
    def _forbidden(exc: Exception) -> tuple[str, int]:
        return render_template(
            "error.html",
            code=403,
            message="Request refused (stale page or other site): reload the page and try again.",
        ), 403

    @app.errorhandler(404)
    def _not_found(exc: Exception) -> tuple[str, int]:
        return render_template("error.html", code=404, message="No such series or file."), 404

    return app
