"""A throw-away PostgreSQL database for the job store's tests (issue 18, several hosts).

The server is the one on ``$L3SPOT_TEST_PG_URL`` (default ``postgres@127.0.0.1:5432``, trust
authentication, as ``.ci/run`` starts it); each test session creates its own database
``l3spot_test_<random>`` and drops it afterwards.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL

#: The maintenance database of the test server (CREATE/DROP DATABASE run there).
ADMIN_URL = os.environ.get(
    "L3SPOT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TABLES = ("exports", "jobs", "destinations", "measurements", "schema_version")


def server_answers(url: str = ADMIN_URL, timeout_s: float = 2.0) -> bool:
    """True when something accepts TCP connections at the server's host and port."""
    u = make_url(url)
    try:
        with socket.create_connection((u.host or "127.0.0.1", u.port or 5432), timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def scratch_database(admin_url: str = ADMIN_URL) -> Iterator[URL]:
    """A new, empty database on the server for the duration of the block, then dropped
    (``WITH (FORCE)``: pooled connections of the stores under test are closed)."""
    name = f"l3spot_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name)
    finally:
        from core import jobs

        for (key, _), engine in list(jobs._ENGINES.items()):
            if key.endswith(f"/{name}"):
                engine.dispose()
        with admin.connect() as con:
            con.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def empty_tables(url: URL) -> None:
    """Drop the job store's tables: the next store starts from a new database."""
    engine = create_engine(url)
    with engine.begin() as con:
        for table in TABLES:
            con.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
