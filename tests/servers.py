"""Throwaway PostgreSQL and Redis servers for the test suite.

Each server runs from the distribution's own binaries in a temporary directory
of its own, listens on a free port of 127.0.0.1 only, and is stopped and
deleted when the test session ends. Nothing is installed or left behind.

Lifecycle: `start()` checks that the binaries are there, prepares the
directory, starts the server in a process group of its own and waits until it
answers; `stop()` asks it to shut down, kills the group when it does not, and
removes the directory. Every failure raises `ServerError` with a message that
says what is missing or, for a server that would not come up, the end of its
log, so that a broken machine reads as a clear failure and never as a skip.
"""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis
from psycopg2 import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

POSTGRES_BINDIR = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = Path("/usr/bin/redis-server")
POSTGRES_SYSTEM_USER = "postgres"
INSTALL_HINT = (
    "the test suite needs the Debian packages postgresql-15 and redis-server "
    "(`apt-get install postgresql-15 redis-server`; .ci/run installs them), or "
    "ENCLAVE_TEST_DATABASE_URL / ENCLAVE_TEST_REDIS_URL naming running servers"
)
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """A test server is missing, would not start, or refused a command."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on at the time of the call.

    The kernel picks it when port 0 is bound; another process could still take
    it before the caller binds it, which on a test machine is rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log was written)"
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


def stop_process_group(
    process: subprocess.Popen,
    first_signal: int = signal.SIGTERM,
    timeout: float = 10.0,
) -> None:
    """Stop a process started with `start_new_session=True`, and its group.

    The group is signalled, not only the leader, so that helpers the process
    forked do not outlive it; whatever is still there after `timeout` seconds
    is killed.
    """
    if process.poll() is None:
        signal_group(process.pid, first_signal)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "pid %s ignored signal %s, killing it", process.pid, first_signal
            )
    # The leader may be gone while forked children of its group linger on.
    signal_group(process.pid, signal.SIGKILL)
    process.wait()


def signal_group(pgid: int, signum: int) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _require_executable(path: Path) -> None:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerError(f"{path} is missing or not executable: {INSTALL_HINT}")


class PostgresServer:
    """A PostgreSQL 15 cluster made by initdb in a temporary directory.

    PostgreSQL refuses to run as root, so when the tests run as root the
    cluster belongs to the `postgres` system user and its programs run as that
    user; the directory is handed to it and removed again at the end.
    """

    user = "enclave"
    database = "enclave_test"

    def __init__(self, bindir: Path = POSTGRES_BINDIR, port: int | None = None):
        self.bindir = Path(bindir)
        self.port = port
        self.root: Path | None = None
        self._process: subprocess.Popen | None = None
        self._run_as: dict = {}

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        for program in ("initdb", "postgres", "pg_isready"):
            _require_executable(self.bindir / program)
        self._run_as = _postgres_identity()
        self.port = self.port or free_port()
        # Not under pytest's base temp: that is private to the current user,
        # and the cluster's owner may be someone else.
        self.root = Path(tempfile.mkdtemp(prefix="enclave-pg-"))
        atexit.register(self.stop)
        data = self.root / "data"
        sockets = self.root / "sockets"
        sockets.mkdir()
        if "user" in self._run_as:
            shutil.chown(self.root, self._run_as["user"], self._run_as["group"])
            shutil.chown(sockets, self._run_as["user"], self._run_as["group"])

        self._initdb(data)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D", str(data),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", f"port={self.port}",
                    "-c", f"unix_socket_directories={sockets}",
                    # Durability buys nothing for a database thrown away at the end.
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                    "-c", "max_connections=300",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=_postgres_environment(),
                start_new_session=True,
                **self._run_as,
            )  # fmt: skip
        self._wait_ready(timeout)
        self.create_database(self.database)
        logger.info("postgres up port=%s root=%s", self.port, self.root)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its name."""
        name = name or f"test_{secrets.token_hex(6)}"
        with _admin_connection(self.url_for("postgres")) as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        return name

    def drop_database(self, name: str) -> None:
        drop_database(self.url_for("postgres"), name)

    def stop(self) -> None:
        if self._process is not None:
            # SIGINT is PostgreSQL's fast shutdown: it ends open sessions
            # instead of waiting for clients that may never disconnect.
            stop_process_group(self._process, signal.SIGINT, timeout=15.0)
            self._process = None
            logger.info("postgres stopped port=%s", self.port)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _initdb(self, data: Path) -> None:
        command = [
            str(self.bindir / "initdb"),
            "-D", str(data),
            "-U", self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            finished = subprocess.run(
                command,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=_postgres_environment(),
                timeout=120,
                **self._run_as,
            )
        if finished.returncode != 0:
            raise ServerError(
                f"initdb exited with {finished.returncode}:\n{log_tail(self.log_path)}"
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = [
            str(self.bindir / "pg_isready"),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-U", self.user,
            "-d", "postgres",
            "-t", "2",
        ]  # fmt: skip
        while True:
            if self._process.poll() is not None:
                raise ServerError(
                    f"postgres exited with {self._process.returncode} while "
                    f"starting:\n{log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"postgres did not accept connections on port {self.port} "
                    f"within {timeout:.0f} s:\n{log_tail(self.log_path)}"
                )
            ready = subprocess.run(
                probe,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)


class ExternalPostgres:
    """A PostgreSQL server someone else runs, named by its URL.

    Databases made per test are created next to the named one, so its user
    needs the CREATEDB privilege.
    """

    def __init__(self, url: str):
        self.url = url

    def url_for(self, database: str) -> str:
        return _replace_path(self.url, f"/{database}")

    def create_database(self, name: str | None = None) -> str:
        name = name or f"test_{secrets.token_hex(6)}"
        with _admin_connection(self.url) as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

        return name

    def drop_database(self, name: str) -> None:
        drop_database(self.url, name)

    def stop(self) -> None:
        """Nothing to stop: the server is not ours."""


def drop_database(admin_url: str, name: str) -> None:
    """Drop a database, ending whatever connections a test left open to it."""
    with _admin_connection(admin_url) as cursor:
        cursor.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


class _admin_connection:
    """An autocommit cursor: CREATE and DROP DATABASE refuse to run in a transaction."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        try:
            self._connection = psycopg2.connect(self.url, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            raise ServerError(
                f"cannot reach the test PostgreSQL server: {exc}"
            ) from exc
        self._connection.autocommit = True
        return self._connection.cursor()

    def __exit__(self, *exc_info):
        self._connection.close()


class RedisServer:
    """A redis-server with no persistence, on a free port of 127.0.0.1."""

    def __init__(self, binary: Path = REDIS_SERVER, port: int | None = None):
        self.binary = Path(binary)
        self.port = port
        self.root: Path | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "redis.log"

    def start(self, timeout: float = 30.0) -> None:
        _require_executable(self.binary)
        self.port = self.port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="enclave-redis-"))
        atexit.register(self.stop)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.root),
                    "--databases", "16",
                    "--daemonize", "no",
                    "--logfile", "",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout)
        logger.info("redis up port=%s", self.port)

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process, signal.SIGTERM, timeout=10.0)
            self._process = None
            logger.info("redis stopped port=%s", self.port)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=1,
            # One attempt per round: the loop below is the retry.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if self._process.poll() is not None:
                    raise ServerError(
                        f"redis-server exited with {self._process.returncode} "
                        f"while starting:\n{log_tail(self.log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"redis-server did not answer PING on port {self.port} "
                        f"within {timeout:.0f} s:\n{log_tail(self.log_path)}"
                    )
                try:
                    if client.ping():
                        return
                except (
                    redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError,
                ):
                    # Not listening yet, still loading, or another program
                    # holds the port: the checks above tell these apart.
                    pass
                time.sleep(0.05)
        finally:
            client.close()


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server, another logical database."""
    return _replace_path(url, f"/{db}")


def _replace_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _postgres_identity() -> dict:
    """Keyword arguments for subprocess that run PostgreSQL as a non-root user."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise ServerError(
            "the tests run as root, which PostgreSQL refuses, and there is no "
            f"{POSTGRES_SYSTEM_USER!r} user to run it as: {INSTALL_HINT}"
        ) from None
    # extra_groups=[] drops root's supplementary groups along with its uid.
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _postgres_environment() -> dict[str, str]:
    # A locale the machine lacks makes initdb fail; PG* variables of the
    # caller's shell would point the tools at another server.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environment.update(LC_ALL="C", LANG="C")
    return environment
