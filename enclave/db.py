"""The database handle every model binds to, chosen from the settings' URL.

PostgreSQL in production (`postgresql://…`, pooled), SQLite for the embedded
default. Connections open and close around each unit of work: per request in
the web app (`enclave.app`), per job in a worker (`workers.jobs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator
from urllib.parse import unquote, urlparse

import peewee
from playhouse.pool import PooledPostgresqlDatabase

from enclave.errors import ConfigurationError

logger = logging.getLogger(__name__)

database = peewee.DatabaseProxy()


def configure_database(url: str, *, max_connections: int = 20) -> peewee.Database:
    """Bind `database` to the server named by `url` and return the concrete handle."""
    if not url:
        raise ConfigurationError("ENCLAVE_DATABASE_URL (or DATABASE_URL) must be set")
    parsed = urlparse(url)
    if parsed.scheme in ("postgres", "postgresql"):
        handle = PooledPostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname,
            port=parsed.port,
            max_connections=max_connections,
            stale_timeout=300,
            timeout=10,
            connect_timeout=5,
        )
    elif parsed.scheme == "sqlite":
        path = unquote(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(f"cannot read a SQLite path from {url!r}")
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # WAL lets the web process read while a worker writes; the busy timeout
        # makes concurrent writers wait for each other instead of failing.
        handle = peewee.SqliteDatabase(
            path,
            pragmas={"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1},
            timeout=10,
        )
    else:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.scheme!r}: use postgresql:// or sqlite:///"
        )
    database.initialize(handle)
    return handle


def dialect() -> str:
    return (
        "postgresql"
        if isinstance(database.obj, peewee.PostgresqlDatabase)
        else "sqlite"
    )


@contextlib.contextmanager
def connection() -> Iterator[peewee.Database]:
    """Hold a connection for one unit of work, and give it back afterwards."""
    opened = database.connect(reuse_if_open=True)
    try:
        yield database
    finally:
        if opened and not database.is_closed():
            database.close()


def write_transaction():
    """A transaction that writes: on SQLite it takes the write lock up front.

    SQLite's default deferred transaction starts as a reader; two of them that
    both read and then write deadlock, and one fails with "database is locked"
    at once, whatever the busy timeout. Starting IMMEDIATE makes the second
    writer wait its turn instead. Nested calls become savepoints.
    """
    if isinstance(database.obj, peewee.SqliteDatabase):
        return database.atomic("IMMEDIATE")
    return database.atomic()


def is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, (peewee.OperationalError, peewee.InterfaceError))
