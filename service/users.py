"""Named users of the web page and their roles (issue 17; docs/web.md "Users and roles").

Users live in the job store's ``users`` table (:class:`core.jobs.JobStore`), so every host
of a site sharing a PostgreSQL job store knows the same users. Passwords are kept only as
salted scrypt hashes made by werkzeug (:func:`werkzeug.security.generate_password_hash`,
maintained by Pallets with Flask); the clear password is never stored, logged or audited.

``l3spot users add|list|remove`` (:mod:`service.commands.users`) calls the functions here;
each change is one audit record (:mod:`service.audit`).
"""

from __future__ import annotations

import re
from enum import StrEnum

from werkzeug.security import check_password_hash, generate_password_hash

from core.errors import L3SpotError
from core.jobs import JobStore, UserRow

#: A user name: letters, digits and ``. _ @ -``, 1 to 64 characters (no ``:``, which HTTP
#: Basic uses as separator, no spaces).
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
#: Shortest password accepted (NIST SP 800-63B section 5.1.1.2 asks for at least 8; a shared
#: hospital workstation warrants more).
MIN_PASSWORD_LENGTH = 12
#: werkzeug's hash method: scrypt with its default cost (N=2**15, r=8, p=1), 16-byte salt.
HASH_METHOD = "scrypt"


class Role(StrEnum):
    """What a user may do; each role may do everything of the roles before it."""

    READER = "reader"  # read every page, accept/correct results (review)
    ADMINISTRATOR = "administrator"  # also retry series, C-ECHO destinations

    @property
    def rank(self) -> int:
        """Order of the roles: a higher rank may do what a lower one may."""
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may."""
        return self.rank >= needed.rank


class UserError(L3SpotError, ValueError):
    """A user name, role or password that cannot be accepted, or an unknown user."""


def check_user_name(name: str) -> str:
    """``name`` when it is a valid user name (:data:`USER_NAME`).

    Raises
    ------
    UserError
        It is not.
    """
    if not USER_NAME.fullmatch(name):
        raise UserError(
            f"user name {name!r}: 1 to 64 letters, digits or . _ @ - (no spaces, no ':')"
        )
    return name


def hash_password(password: str) -> str:
    """The salted scrypt hash of ``password`` (werkzeug's ``scrypt:N:r:p$salt$hash``).

    Raises
    ------
    UserError
        The password is shorter than :data:`MIN_PASSWORD_LENGTH`.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    return generate_password_hash(password, method=HASH_METHOD)


#: Checked against when the user does not exist, so that a wrong name takes as long as a
#: wrong password (no user enumeration by timing).
_DUMMY_HASH = generate_password_hash("not a password of anyone", method=HASH_METHOD)


def verify_password(user: UserRow | None, password: str) -> bool:
    """True when ``password`` is ``user``'s; False (after as much work) when ``user`` is None."""
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(user.password_hash, password)


def add_user(store: JobStore, name: str, role: Role, password: str, replace: bool = False) -> bool:
    """Store user ``name`` with ``role`` and the hash of ``password``.

    Parameters
    ----------
    store : the job store (its ``users`` table).
    name : the user name (:data:`USER_NAME`).
    role : the user's role.
    password : the clear password; only its hash is stored.
    replace : change an existing user's role and password instead of refusing.

    Returns
    -------
    bool
        True when the user is new, False when an existing one was changed.

    Raises
    ------
    UserError
        Invalid name or password, or the user exists and ``replace`` is False.
    """
    check_user_name(name)
    if not replace and store.user(name) is not None:
        raise UserError(f"user {name!r} exists: use --replace to change role or password")
    return store.put_user(name, str(Role(role)), hash_password(password))


def remove_user(store: JobStore, name: str) -> None:
    """Delete user ``name``.

    Raises
    ------
    UserError
        No such user.
    """
    if not store.remove_user(name):
        raise UserError(f"no user {name!r}")
