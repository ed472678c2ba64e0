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
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


class Authenticator:
    """Finds the user of a request according to ``web`` (one per web application).

    Parameters
    ----------
    web : the ``web`` section (``auth``, ``token``, ``proxy_*``, ``trusted_proxies``).
    store : the job store holding the users (read per request: a removed user is out at
        once).
    audit : where failed logins and refused proxy headers are recorded (None: not audited).
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
        """
        auth = req.authorization
        if self.token and auth is not None:
            given = (auth.token if auth.type == "bearer" else auth.password) or ""
            if (auth.type == "bearer" or self.mode == "token") and hmac.compare_digest(
                given.encode(), self.token.encode()
            ):
                return User(AUTOMATION, Role.ADMINISTRATOR, "token")
        if self.mode == "users":
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
        with self._lock:
            self._verified[digest] = None
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return User(row.name, Role(row.role))

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
        log_event(
            log,
            "web_login_failed",
            logging.WARNING,
            user=name,
            remote_address=req.remote_addr,
            reason=reason,
        )
        if self.audit is not None:
            self.audit.record(
                event="web_login_failed",
                outcome="refused",
                user=name,
                address=req.remote_addr,
                reason=reason,
                method=self.mode,
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
    ProxyRefusedError
        See :meth:`Authenticator.identify`.
    """
    if ENVIRON_KEY not in req.environ:
        try:
            req.environ[ENVIRON_KEY] = _authenticator().identify(req)
        except ProxyRefusedError as exc:
            req.environ[ENVIRON_KEY] = exc  # refused once, audited once
    found = req.environ[ENVIRON_KEY]
    if isinstance(found, ProxyRefusedError):
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
    401 (no or wrong credentials), 403 (role too low, or a refused proxy header)."""
    auth = _authenticator()
    if not auth.enabled:
        return None
    try:
        user = current_user(req)
    except ProxyRefusedError:
        return _forbidden("Refused: your sign-in cannot be accepted here.")
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
