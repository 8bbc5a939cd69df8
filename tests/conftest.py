"""Fixtures shared by the whole suite: real servers and a running service.

The suite talks to real PostgreSQL and Redis servers. By default it starts
throwaway ones (see `tests/servers.py`); `ENCLAVE_TEST_DATABASE_URL` and
`ENCLAVE_TEST_REDIS_URL` point it at servers that already run instead (the
tests create and drop databases there and flush Redis databases, so never
point them at data worth keeping). A
missing server binary fails the run with a message saying what to install:
nothing in this suite is ever skipped, in CI or anywhere else, because a
skipped test looks green while proving nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from tests.servers import (
    ExternalPostgres,
    PostgresServer,
    RedisServer,
    ServerError,
    redis_url_with_db,
)
from tests.stack import ServiceStack

REDIS_DATABASES = 16


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report a skipped test as failed: the suite's rule is that nothing skips."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({reason}); this suite does not allow skips: "
            "install what the test needs or make it fail with a clear message"
        )
    return report


def _start(server):
    try:
        server.start()
    except ServerError as exc:
        server.stop()
        problem = str(exc)
    else:
        return server
    # Failed outside the except block, so the report shows the message once.
    pytest.fail(problem, pytrace=False)


def _create_database(server) -> str:
    try:
        return server.create_database()
    except ServerError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server: the one named in the environment, or our own."""
    url = os.environ.get("ENCLAVE_TEST_DATABASE_URL")
    if url:
        yield ExternalPostgres(url)
        return

    server = _start(PostgresServer())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    return postgres_server.url


@pytest.fixture
def fresh_postgres_url(postgres_server):
    """A new, empty database on the session's server, dropped after the test."""
    name = _create_database(postgres_server)
    yield postgres_server.url_for(name)
    postgres_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'enclave.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
def any_database_url(request) -> str:
    """An empty database of each kind the service supports, one per run of the test."""
    if request.param == "postgres":
        return request.getfixturevalue("fresh_postgres_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("ENCLAVE_TEST_REDIS_URL")
    if url:
        yield url
        return

    server = _start(RedisServer())
    yield server.url
    server.stop()


@pytest.fixture
def redis_client(redis_url):
    """A client of the `redis_url` database, emptied before the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def stack_factory(request, tmp_path_factory, redis_url):
    """Start the service's real processes; every stack made is stopped after the test.

    `make(database="postgres" | "sqlite", workers=2, backend="simulator",
    env={...}, reaper=True, wait=True, timeout=60.0, database_url=None)` returns
    a started `ServiceStack`, healthy unless `wait=False`. Each stack gets a
    new empty database and an emptied Redis database of its own.
    """
    stacks: list[ServiceStack] = []
    databases: list[tuple[object, str]] = []
    # Each stack of the test gets a Redis database of its own, never the one
    # `redis_client` uses; they are flushed before use, so the next test may
    # take the same numbers again.
    own_db = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get(
        "db", 0
    )
    free_dbs = [db for db in range(REDIS_DATABASES) if db != own_db]

    def make(
        *,
        database: str = "postgres",
        database_url: str | None = None,
        wait: bool = True,
        timeout: float = 60.0,
        **options,
    ) -> ServiceStack:
        workdir = tmp_path_factory.mktemp("stack")
        if database_url is None:
            database_url = _new_database(database, workdir)

        if len(stacks) == len(free_dbs):
            raise RuntimeError(f"at most {len(free_dbs)} stacks can run in one test")
        stack_redis_url = redis_url_with_db(redis_url, free_dbs[len(stacks)])
        client = redis.Redis.from_url(stack_redis_url)
        client.flushdb()
        client.close()

        stack = ServiceStack(
            database_url=database_url,
            redis_url=stack_redis_url,
            workdir=workdir,
            **options,
        )
        stacks.append(stack)
        stack.start()
        if wait:
            stack.wait_healthy(timeout)
        return stack

    def _new_database(kind: str, workdir: Path) -> str:
        if kind == "sqlite":
            return f"sqlite:///{workdir / 'enclave.db'}"
        if kind != "postgres":
            raise ValueError(f"database must be 'postgres' or 'sqlite', not {kind!r}")
        server = request.getfixturevalue("postgres_server")
        name = _create_database(server)
        databases.append((server, name))
        return server.url_for(name)

    yield make

    for stack in reversed(stacks):
        stack.stop()
    for server, name in databases:
        server.drop_database(name)
