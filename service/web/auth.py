"""Who is asking: the web page's users, roles and their checks (issue 17).

``web.auth`` picks how a request names its user (docs/web.md "Users and roles"):

``token``  only ``web.token``, as a bearer token or as the HTTP Basic password (any user
           name); without a token the page is open (loopback only, :func:`check_web_config`
           in :mod:`service.web.app`).
``users``  HTTP Basic with the name and password of a user of ``l3spot users add``
           (:mod:`service.users`; browsers ask for them).
``proxy``  the user a trusted reverse proxy (hospital single sign-on) names in
           ``web.proxy_user_header``; only from a peer in ``web.trusted_proxies``: the header
           from any other address is refused (403). The role comes from
           ``web.proxy_role_header`` mapped by ``web.proxy_roles``, else the users table, else
           ``web.proxy_default_role``.

In every mode ``web.token``, when set, is accepted as a bearer token: the *automation*
identity, with the rights of an administrator (monitoring, scripts).

:func:`current_user` is the one answer to "who is this" for every route; :func:`require`
guards a route with a role. Failed logins and refused proxy headers are audited
(:mod:`service.audit`), never with the password.

Failed sign-ins (``users`` and ``token`` modes) are throttled by :class:`LoginThrottle`:
``web.login_max_failures`` wrong passwords for one user name from one client address within
``web.login_window_seconds`` (or ``web.login_max_failures_per_address`` for any names) and
that address's next attempts are answered 429 with ``Retry-After``, before any password
check, until the window has passed. Nothing is locked: the right password from another
address is always checked (an attacker cannot lock the readers out). The client address is
the peer's, or behind a ``web.trusted_proxies`` reverse proxy the nearest untrusted
``X-Forwarded-For`` hop (:meth:`Authenticator.client_address`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Request, Response, current_app, render_template, request

from core.config import WebConfig
from core.errors import L3SpotError
from core.jobs import JobStore
from core.logs import log_event
from service.audit import AuditLog
from service.users import USER_NAME, Role, verify_password

log = logging.getLogger(__name__)

#: Name of the identity that presents ``web.token``.
AUTOMATION = "automation"
#: Name recorded for actions on an open page (no authentication configured, loopback only).
ANONYMOUS = "anonymous"
#: Where the request's user is kept once found (``request.environ``).
ENVIRON_KEY = "l3spot.user"
#: Key of the :class:`Authenticator` in ``app.extensions``.
EXTENSION_KEY = "l3spot.auth"
#: Checked Basic passwords remembered per process (scrypt costs ~0.1 s; browsers send the
#: password with every request).
VERIFIED_CACHE_SIZE = 256

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class User:
    """The user of one request.

    Attributes
    ----------
    name : the user name (:data:`AUTOMATION` for ``web.token``).
    role : what the user may do.
    method : how the user was recognised: ``password``, ``proxy`` or ``token``.
    """

    name: str
    role: Role
    method: str = "password"

    def allows(self, needed: Role) -> bool:
        """True when this user may do what ``needed`` may."""
        return self.role.allows(needed)


class ProxyRefusedError(L3SpotError, PermissionError):
    """A user header from a peer that is not a trusted proxy, or a user without a role."""


class LoginThrottledError(L3SpotError, PermissionError):
    """Too many failed sign-ins from one address (for one user name): answered 429.

    Attributes
    ----------
    address : the client address (:meth:`Authenticator.client_address`).
    user : the user name tried ("" for a bearer token).
    retry_after_s : seconds until that address's attempts are checked again.
    """

    def __init__(self, address: str, user: str, retry_after_s: float) -> None:
        super().__init__(f"sign-in from {address} throttled for {retry_after_s:.0f} s")
        self.address = address
        self.user = user
        self.retry_after_s = retry_after_s


@dataclass
class _Failures:
    """The recent failure times (clock seconds) of one key, newest last."""

    times: deque[float]
    #: the clock time until which this key's current throttle has been reported (audit)
    reported_until: float = field(default=-math.inf)


class LoginThrottle:
    """Failed sign-ins per (client address, user name) and per client address, in a sliding
    window; bounded memory (the least recently failed keys are forgotten first).

    A key is throttled while it has ``limit`` failures younger than ``window_s`` seconds:
    at most ``limit`` wrong passwords per window. Throttled attempts are not checked, so
    they add no failure: the throttle ends ``window_s`` after the oldest of those failures.

    Parameters
    ----------
    max_failures : failures for one user name from one address (``web.login_max_failures``).
    max_failures_per_address : failures from one address whatever the names
        (``web.login_max_failures_per_address``; against guessing many names).
    window_s : the window in seconds (``web.login_window_seconds``).
    max_tracked : most keys remembered per kind (pairs, addresses): ``web.login_tracked_max``.

    Notes
    -----
    OWASP Authentication Cheat Sheet, "Login Throttling": throttle by source rather than
    lock the account, which would let anyone lock a user out.
    """

    def __init__(
        self,
        max_failures: int,
        max_failures_per_address: int,
        window_s: float,
        max_tracked: int,
    ) -> None:
        self.max_failures = max_failures
        self.max_failures_per_address = max_failures_per_address
        self.window_s = window_s
        self.max_tracked = max_tracked
        #: seconds, monotonic (tests set another clock)
        self.clock: Callable[[], float] = time.monotonic
        self._pairs: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, web: WebConfig) -> LoginThrottle:
        """The throttle of the ``web`` section's ``login_*`` keys."""
        return cls(
            web.login_max_failures,
            web.login_max_failures_per_address,
            web.login_window_seconds,
            web.login_tracked_max,
        )

    def _wait(self, failures: _Failures | None, limit: int, now: float) -> float:
        if failures is None:
            return 0.0
        times = failures.times
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if len(times) < limit:
            return 0.0
        return times[-limit] + self.window_s - now

    def retry_after(self, address: str, user: str) -> float:
        """Seconds until attempts from ``address`` for ``user`` are checked again; 0 when
        they are checked now."""
        return self.refusal(address, user)[0]

    def refusal(self, address: str, user: str) -> tuple[float, bool, int]:
        """(seconds to wait, first refusal of this throttle, failures in the window).

        The seconds are 0 when the attempt is to be checked. "First" is True once per
        throttle of a key (for the audit record; later refusals are not reported again).
        """
        now = self.clock()
        key = (address, user[:64])
        with self._lock:
            pair = self._pairs.get(key)
            by_address = self._addresses.get(address)
            waits = [
                (self._wait(pair, self.max_failures, now), pair),
                (self._wait(by_address, self.max_failures_per_address, now), by_address),
            ]
            wait, failures = max(waits, key=lambda w: w[0])
            if wait <= 0 or failures is None:
                return 0.0, False, 0
            first = failures.reported_until <= now
            if first:
                failures.reported_until = now + wait
            return wait, first, len(failures.times)

    def _add(self, table: OrderedDict, key: object, limit: int, now: float) -> int:
        found = table.get(key)
        if found is None:
            found = table[key] = _Failures(deque(maxlen=max(limit, 1)))
        found.times.append(now)
        table.move_to_end(key)
        while len(table) > self.max_tracked:
            table.popitem(last=False)
        return len(found.times)

    def failed(self, address: str, user: str) -> int:
        """Record a failed sign-in; returns the pair's failures in the window (this one
        included)."""
        now = self.clock()
        with self._lock:
            self._add(self._addresses, address, self.max_failures_per_address, now)
            return self._add(self._pairs, (address, user[:64]), self.max_failures, now)

    def succeeded(self, address: str, user: str) -> None:
        """Forget the pair's failures after a right password (the address's stay: a valid
        account must not reset the count of an address guessing other names)."""
        with self._lock:
            self._pairs.pop((address, user[:64]), None)

    def tracked(self) -> int:
        """How many keys (pairs and addresses) are remembered now."""
        with self._lock:
            return len(self._pairs) + len(self._addresses)


class Authenticator:
    """Finds the user of a request according to ``web`` (one per web application).

    Parameters
    ----------
    web : the ``web`` section (``auth``, ``token``, ``proxy_*``, ``trusted_proxies``).
    store : the job store holding the users (read per request: a removed user is out at
        once).
    audit : where failed logins, throttled sign-ins and refused proxy headers are recorded
        (None: not audited).
    """

    def __init__(self, web: WebConfig, store: JobStore, audit: AuditLog | None) -> None:
        self.web = web
        self.mode = web.auth
        self.token = (web.token or "").strip()
        self.store = store
        self.audit = audit
        self.proxies = [ipaddress.ip_network(c) for c in web.trusted_proxies]
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.throttle = LoginThrottle.from_config(web)

    @property
    def enabled(self) -> bool:
        """False only in ``token`` mode without a token: the page is open (loopback)."""
        return self.mode != "token" or bool(self.token)

    def challenge(self) -> Response:
        """401 asking for credentials (HTTP Basic where a password is accepted)."""
        scheme = "Bearer" if self.mode == "proxy" else "Basic"
        return Response(
            "authentication required\n",
            401,
            {"WWW-Authenticate": f'{scheme} realm="l3spot", charset="UTF-8"'},
            mimetype="text/plain",
        )

    def identify(self, req: Request) -> User | None:
        """The user of ``req``; None when it names none (or wrong credentials).

        Raises
        ------
        ProxyRefusedError
            Proxy mode: the user header came from a peer outside ``web.trusted_proxies``,
            or names a user without a role.
        LoginThrottledError
            ``users``/``token`` mode: too many failed sign-ins from this client address
            (for this user name); the credentials were not checked.
        """
        auth = req.authorization
        if auth is not None and self.mode in ("users", "token"):
            self._check_throttle(req, (auth.username or "") if auth.type == "basic" else "")
        if self.token and auth is not None:
            given = (auth.token if auth.type == "bearer" else auth.password) or ""
            if (auth.type == "bearer" or self.mode == "token") and hmac.compare_digest(
                given.encode(), self.token.encode()
            ):
                return User(AUTOMATION, Role.ADMINISTRATOR, "token")
        if self.mode == "users":
            if auth is not None and auth.type == "bearer" and self.token:
                self._failed(req, "", "bad token")
            if auth is None or auth.type != "basic":
                return None
            return self._password_user(req, auth.username or "", auth.password or "")
        if self.mode == "proxy":
            return self._proxy_user(req)
        if auth is not None:
            self._failed(req, (auth.username or "") if auth.type == "basic" else "", "bad token")
        return None

    def _password_user(self, req: Request, name: str, password: str) -> User | None:
        row = self.store.user(name) if USER_NAME.fullmatch(name) else None
        digest = b""
        if row is not None:
            digest = hmac.new(
                self._key, f"{row.password_hash}\0{password}".encode(), hashlib.sha256
            ).digest()
            with self._lock:
                if digest in self._verified:
                    self._verified.move_to_end(digest)
                    return User(row.name, Role(row.role))
        if not verify_password(row, password):
            self._failed(req, name, "wrong user name or password")
            return None
        assert row is not None  # verify_password is False without a row
        self.throttle.succeeded(self.client_address(req), name)
        with self._lock:
            self._verified[digest] = None
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return User(row.name, Role(row.role))

    def client_address(self, req: Request) -> str:
        """The address a sign-in comes from: the peer's, or when the peer is one of
        ``web.trusted_proxies``, the nearest ``X-Forwarded-For`` hop that is not (a proxy
        appends the address it received from; hops further left are the client's word)."""
        peer = req.remote_addr or ""
        if not self._trusted_peer(peer):
            return peer
        hops = [
            hop.strip()
            for value in req.headers.getlist("X-Forwarded-For")
            for hop in value.split(",")
            if hop.strip()
        ]
        for hop in reversed(hops):
            if not self._trusted_peer(hop):
                return hop[:64]
        return peer

    def _check_throttle(self, req: Request, name: str) -> None:
        address = self.client_address(req)
        wait, first, failures = self.throttle.refusal(address, name)
        if wait <= 0:
            return
        if first:  # once per throttle: a flood of refused attempts writes one record
            log_event(
                log,
                "web_login_throttled",
                logging.WARNING,
                user=name[:64],
                remote_address=address,
                failures=failures,
                retry_after_s=math.ceil(wait),
            )
            if self.audit is not None:
                self.audit.record(
                    event="web_login_throttled",
                    outcome="throttled",
                    user=name[:64],
                    address=address,
                    reason="too many failed sign-ins from this address",
                    failures=failures,
                    retry_after_s=math.ceil(wait),
                    method=self.mode,
                )
        raise LoginThrottledError(address, name[:64], wait)

    def _trusted_peer(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def _proxy_user(self, req: Request) -> User | None:
        name = req.headers.get(self.web.proxy_user_header, "").strip()
        if not name:
            return None
        if not self._trusted_peer(req.remote_addr):
            self._failed(req, name[:64], "user header from an untrusted peer")
            raise ProxyRefusedError(f"{self.web.proxy_user_header} from {req.remote_addr}")
        role = self._proxy_role(req, name)
        if role is None:
            self._failed(req, name[:64], "signed-in user without a role")
            raise ProxyRefusedError(f"user {name[:64]!r} has no role")
        return User(name, role, "proxy")

    def _proxy_role(self, req: Request, name: str) -> Role | None:
        roles: list[Role] = []
        if self.web.proxy_role_header:
            groups = req.headers.get(self.web.proxy_role_header, "")
            for group in groups.replace(";", ",").split(","):
                mapped = self.web.proxy_roles.get(group.strip())
                if mapped is not None:
                    roles.append(Role(mapped))
        if not roles and USER_NAME.fullmatch(name):
            row = self.store.user(name)
            if row is not None:
                roles.append(Role(row.role))
        if not roles and self.web.proxy_default_role is not None:
            roles.append(Role(self.web.proxy_default_role))
        return max(roles, key=lambda r: r.rank) if roles else None

    def _failed(self, req: Request, name: str, reason: str) -> None:
        address = self.client_address(req)
        failures = None
        if self.mode in ("users", "token"):  # a guessed password or token, not a proxy's
            failures = self.throttle.failed(address, name)
        log_event(
            log,
            "web_login_failed",
            logging.WARNING,
            user=name[:64],
            remote_address=address,
            reason=reason,
            failures=failures,
        )
        if self.audit is not None:
            self.audit.record(
                event="web_login_failed",
                outcome="refused",
                user=name[:64],
                address=address,
                reason=reason,
                method=self.mode,
                **({} if failures is None else {"failures": failures}),
            )


def _authenticator() -> Authenticator:
    auth: Authenticator = current_app.extensions[EXTENSION_KEY]
    return auth


def current_user(req: Request) -> User | None:
    """The user of request ``req`` (found once per request), or None when it names none.

    None also when the page is open (``web.auth: token`` without a token, loopback only):
    :func:`require` then lets every request through.

    Raises
    ------
    ProxyRefusedError, LoginThrottledError
        See :meth:`Authenticator.identify`.
    """
    if ENVIRON_KEY not in req.environ:
        try:
            req.environ[ENVIRON_KEY] = _authenticator().identify(req)
        except (ProxyRefusedError, LoginThrottledError) as exc:
            req.environ[ENVIRON_KEY] = exc  # refused once, audited once
    found = req.environ[ENVIRON_KEY]
    if isinstance(found, ProxyRefusedError | LoginThrottledError):
        raise found
    user: User | None = found
    return user


def signed_in_name(req: Request) -> str:
    """The name to record for an action of ``req`` (review decisions, audit): the user's
    name, or :data:`ANONYMOUS` when the page is open (``web.auth: token`` without a token).
    Call it behind :func:`require`, which has refused requests without a user."""
    user = current_user(req) if _authenticator().enabled else None
    return user.name if user is not None else ANONYMOUS


def refusal(req: Request, needed: Role) -> Response | None:
    """None when ``req`` may do what role ``needed`` may, else the response refusing it:
    401 (no or wrong credentials), 403 (role too low, or a refused proxy header), 429 with
    ``Retry-After`` (too many failed sign-ins from this address: :class:`LoginThrottle`)."""
    auth = _authenticator()
    if not auth.enabled:
        return None
    try:
        user = current_user(req)
    except ProxyRefusedError:
        return _forbidden("Refused: your sign-in cannot be accepted here.")
    except LoginThrottledError as exc:
        seconds = max(1, math.ceil(exc.retry_after_s))
        return Response(
            f"too many failed sign-ins from this address: try again in {seconds} s\n",
            429,
            {"Retry-After": str(seconds)},
            mimetype="text/plain",
        )
    if user is None:
        return auth.challenge()
    if not user.allows(needed):
        return _forbidden(f"Your role ({user.role}) may not do this: it needs {needed}.")
    return None


def _forbidden(message: str) -> Response:
    return Response(render_template("error.html", code=403, message=message), 403)


def require(role: Role) -> Callable[[_F], _F]:
    """Decorator of a view: only users with ``role`` or a higher one (see :func:`refusal`).

    Example
    -------
    ``@app.post("/jobs/<uid>/retry")`` then ``@require(Role.ADMINISTRATOR)``.
    """

    def decorate(view: _F) -> _F:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            refused = refusal(request, role)
            return refused if refused is not None else view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
