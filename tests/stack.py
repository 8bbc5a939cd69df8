"""The service as a deployment runs it, started as real processes by a test.

`ServiceStack` runs the same entry points a deployment does: the migrations
once, then gunicorn serving `wsgi:app`, a number of RQ workers, the reaper
and, with `egress=True`, the egress proxy (waited for until it listens), each
a subprocess in a session of its own with stdout and stderr in a log file of
its own, all configured through the environment alone.

Lifecycle: `start()` runs the migrations to completion (a failure stops
everything and raises with the log), then starts the long-running processes;
`wait_healthy()` polls `GET /healthz` until it answers 200. `stop()` sends
SIGTERM to every process group, SIGKILL to what is left after a deadline,
and finally kills any process that still carries this stack's marker in its
environment: a job runner that moved into a session of its own is out of
reach of a process-group signal, but not of that sweep.

Also here: the HTTP helpers tests use to talk to a stack (`client`, `token`,
`stream`) and the text/event-stream parser behind `stream`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import jwt
import requests

from tests.servers import free_port, log_tail, signal_group, stop_process_group

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
STACK_MARKER = "ENCLAVE_TEST_STACK_ID"
DEFAULT_SCOPES = ("sessions:read", "sessions:write")
# Inherited settings of the developer's shell must not leak into a stack: a
# stray ENCLAVE_AUTH_DISABLED=1 would make every authentication test lie.
INHERITED_SETTINGS_PREFIX = "ENCLAVE_"
INHERITED_SETTINGS_FALLBACKS = ("DATABASE_URL", "REDIS_URL")


class StackError(RuntimeError):
    """A process of the stack failed to start, died, or the service never became healthy."""


class StreamRefused(StackError):
    """`GET /sessions/{id}/stream` answered something other than an event stream."""

    def __init__(self, status_code: int, body: str):
        super().__init__(f"the stream answered {status_code}: {body[:500]}")
        self.status_code = status_code
        self.body = body


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    event: str
    data: Any
    raw: str = field(repr=False)

    @property
    def seq(self) -> int:
        """The event's number in its session: the stream's ids are integers."""
        if self.id is None:
            raise ValueError(f"the {self.event} event carries no id")
        return int(self.id)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    killed: bool = False


class ApiClient(requests.Session):
    """A `requests.Session` that takes paths relative to the service's base URL.

    Every request gets a timeout unless the caller gives one, so a hung
    service fails a test instead of hanging the suite.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"

    def request(self, method, url, *args, **kwargs):
        if url.startswith("/"):
            url = self.base_url + url
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


class ServiceStack:
    """Migrations, web, workers and reaper of one deployment, as subprocesses."""

    migrate_command: tuple[str, ...] = (sys.executable, "-m", "enclave", "migrate")
    web_command: tuple[str, ...] = (
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "config/gunicorn.py",
        "wsgi:app",
    )
    worker_command: tuple[str, ...] = (sys.executable, "-m", "workers.worker")
    reaper_command: tuple[str, ...] = (sys.executable, "-m", "workers.reaper")
    egress_command: tuple[str, ...] = (sys.executable, "-m", "enclave.egress")

    def __init__(
        self,
        *,
        database_url: str,
        redis_url: str,
        workdir: Path,
        workers: int = 2,
        backend: str = "simulator",
        reaper: bool = True,
        egress: bool = False,
        env: Mapping[str, str | None] | None = None,
        stop_timeout: float = 10.0,
        migrate_timeout: float = 120.0,
    ):
        self.database_url = database_url
        self.redis_url = redis_url
        self.backend = backend
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / "logs"
        self.state_dir = self.workdir / "state"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.jwt_secret = secrets.token_urlsafe(48)
        # A queue of its own, so that a stack's workers never take another's jobs.
        self.queue_name = f"enclave-test-{secrets.token_hex(6)}"
        self.stack_id = secrets.token_hex(8)
        # With `egress`, the proxy process runs too, on a port of its own.
        self.egress_port = free_port() if egress else None
        self.env = self._environment(env or {})

        self.stop_timeout = stop_timeout
        self.migrate_timeout = migrate_timeout
        self._worker_count = workers
        self._with_reaper = reaper
        self.egress: _Process | None = None
        self._processes: list[_Process] = []
        self.web: _Process | None = None
        self.workers: list[_Process] = []
        self.reaper: _Process | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> Self:
        try:
            self._migrate()
            self.web = self._spawn("web", self.web_command, {"PORT": str(self.port)})
            for _ in range(self._worker_count):
                self.start_worker()
            if self._with_reaper:
                self.reaper = self._spawn("reaper", self.reaper_command)
            if self.egress_port is not None:
                self.egress = self._spawn("egress", self.egress_command)
                self._wait_for_egress()
        except BaseException:
            self.stop()
            raise

        logger.info(
            "stack started stack_id=%s port=%s workers=%s backend=%s",
            self.stack_id,
            self.port,
            self._worker_count,
            self.backend,
        )
        return self

    def start_worker(self) -> int:
        """Start one more worker; returns its index for `kill_worker`."""
        index = len(self.workers)
        self.workers.append(self._spawn(f"worker-{index}", self.worker_command))
        return index

    def kill_worker(
        self,
        index: int,
        sig: int = signal.SIGKILL,
        wait: bool = True,
        timeout: float = 15.0,
    ) -> int | None:
        """Signal worker `index` and its whole process group.

        With `wait`, returns the worker's exit status once it is gone (a
        negative number is the signal that ended it).
        """
        worker = self.workers[index]
        worker.killed = True
        signal_group(worker.popen.pid, sig)
        if not wait:
            return None

        try:
            return worker.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StackError(
                f"worker {index} still runs {timeout:.0f} s after signal {sig}:\n"
                f"{log_tail(worker.log_path)}"
            ) from None

    def stop(self) -> None:
        """End every process of the stack; safe to call more than once."""
        # Only groups whose leader is not yet reaped: the id of a group that
        # emptied may already name someone else's. Leftovers of those groups
        # carry the marker and fall to the sweep below.
        running = [p for p in self._processes if p.popen.poll() is None]
        for process in running:
            signal_group(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in running:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "stack process still running after SIGTERM stack_id=%s name=%s",
                    self.stack_id,
                    process.name,
                )
        for process in running:
            stop_process_group(process.popen, signal.SIGKILL, timeout=5.0)
        self._sweep()

    def wait_healthy(self, timeout: float = 60.0) -> dict:
        """Poll `GET /healthz` until it answers 200; returns the health document."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            self._check_alive()
            try:
                response = requests.get(f"{self.base_url}/healthz", timeout=2)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response.json()
                last = f"{response.status_code} {response.text[:500]}"
            if time.monotonic() > deadline:
                raise StackError(
                    f"the service at {self.base_url} was not healthy within "
                    f"{timeout:.0f} s; last answer: {last}\n{self.log_tails()}"
                )
            time.sleep(0.2)

    def logs(self) -> str:
        """Everything every process of the stack wrote so far, one section each."""
        return "\n".join(
            f"==> {process.name} <==\n{process.log_path.read_text(errors='replace')}"
            for process in self._processes
        )

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"==> {process.name} (last {lines} lines) <==\n"
            f"{log_tail(process.log_path, lines)}"
            for process in self._processes
        )

    def client(self, token: str | None = None, timeout: float = 30.0) -> ApiClient:
        return ApiClient(self.base_url, token, timeout)

    def token(
        self,
        org_id: str,
        scopes: Iterable[str] | str = DEFAULT_SCOPES,
        sub: str = "user_test",
        ttl: float = 300,
        **claims: Any,
    ) -> str:
        """An HS256 user JWT signed with this stack's secret."""
        scope = scopes if isinstance(scopes, str) else " ".join(scopes)
        payload = {
            "sub": sub,
            "org_id": org_id,
            "scope": scope,
            "exp": int(time.time() + ttl),
            **claims,
        }
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def stream(
        self,
        session_id: str,
        token: str,
        last_event_id: int | str | None = None,
        timeout: float = 30.0,
    ) -> Iterator[SseEvent]:
        """Follow `GET /sessions/{id}/stream` until the server closes it.

        Raises `TimeoutError` once `timeout` seconds have passed in all, and
        `StreamRefused` when the answer is not an event stream.
        """
        headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {token}"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        deadline = time.monotonic() + timeout

        with requests.get(
            f"{self.base_url}/sessions/{session_id}/stream",
            headers=headers,
            stream=True,
            timeout=(5, timeout),
        ) as response:
            content_type = response.headers.get("Content-Type", "")
            if response.status_code != 200 or not content_type.startswith(
                "text/event-stream"
            ):
                raise StreamRefused(response.status_code, response.text)
            chunks = response.iter_content(chunk_size=None)
            yield from parse_sse(_before(deadline, timeout, chunks))

    def _migrate(self) -> None:
        process = self._spawn("migrate", self.migrate_command)
        try:
            code = process.popen.wait(timeout=self.migrate_timeout)
        except subprocess.TimeoutExpired:
            raise StackError(
                f"migrations still running after {self.migrate_timeout:.0f} s:\n"
                f"{log_tail(process.log_path)}"
            ) from None
        if code != 0:
            raise StackError(
                f"migrations exited with {code}:\n{log_tail(process.log_path)}"
            )

    def _spawn(
        self,
        name: str,
        command: Iterable[str],
        extra_env: Mapping[str, str] | None = None,
    ) -> _Process:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(command),
                cwd=REPO_ROOT,
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A group of its own: signals reach the process and what it forks.
                start_new_session=True,
            )
        process = _Process(name, popen, log_path)
        self._processes.append(process)
        logger.debug("stack process started name=%s pid=%s", name, popen.pid)
        return process

    def _wait_for_egress(self, timeout: float = 30.0) -> None:
        """Wait until the egress proxy accepts connections on its port."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.egress_port), 1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"the egress proxy did not listen within {timeout:.0f} s:\n"
                    f"{self.log_tails()}"
                )
            time.sleep(0.1)

    def _check_alive(self) -> None:
        for process in self._processes:
            if process.name == "migrate" or process.killed:
                continue
            code = process.popen.poll()
            if code is not None:
                raise StackError(
                    f"{process.name} exited with {code}:\n{self.log_tails()}"
                )

    def _environment(self, extra: Mapping[str, str | None]) -> dict[str, str]:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(INHERITED_SETTINGS_PREFIX)
            and key not in INHERITED_SETTINGS_FALLBACKS
        }
        environment.update(
            PYTHONUNBUFFERED="1",
            ENCLAVE_ENV="test",
            ENCLAVE_DATABASE_URL=self.database_url,
            ENCLAVE_REDIS_URL=self.redis_url,
            ENCLAVE_JWT_SECRET=self.jwt_secret,
            ENCLAVE_BACKEND=self.backend,
            ENCLAVE_QUEUE_NAME=self.queue_name,
            ENCLAVE_STATE_DIR=str(self.state_dir),
        )
        # The local backend's root filesystem, when the machine has one built.
        rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS")
        if rootfs:
            environment["ENCLAVE_SANDBOX_ROOTFS"] = rootfs
        if self.egress_port is not None:
            environment["ENCLAVE_EGRESS_PROXY_ADDRESS"] = (
                f"127.0.0.1:{self.egress_port}"
            )
        for key, value in extra.items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = str(value)
        environment[STACK_MARKER] = self.stack_id

        return environment

    def _sweep(self) -> None:
        """Kill processes of this stack that left its process groups."""
        marker = f"{STACK_MARKER}={self.stack_id}".encode()
        for _ in range(10):
            strays = list(_pids_with_environment_entry(marker))
            if not strays:
                return
            logger.info(
                "killing stray stack processes stack_id=%s pids=%s",
                self.stack_id,
                strays,
            )
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        logger.warning("stray stack processes survived stack_id=%s", self.stack_id)


def parse_sse(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    """Events of a text/event-stream body, given as bytes split anywhere.

    Follows the WHATWG rules: lines end in CRLF, LF or CR; a line starting
    with a colon is a comment; `data` lines accumulate; a blank line ends an
    event, which is dispatched only if it had data; the last `id` seen
    carries over to later events; a final event not closed by a blank line is
    dropped. Each event's data must be one JSON document, as the API promises.
    """
    event_type = ""
    data: list[str] = []
    last_id: str | None = None

    for line in _sse_lines(chunks):
        if not line:
            if data:
                raw = "\n".join(data)
                yield SseEvent(last_id, event_type or "message", _json(raw), raw)
            event_type, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        # `retry` and unknown fields mean nothing to a test client.


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _sse_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    buffer = b""
    first = True
    for chunk in chunks:
        buffer += chunk
        while True:
            end = _LINE_END.search(buffer)
            if end is None:
                break
            # A CR at the very end may be the first half of a CRLF.
            if end.group() == b"\r" and end.end() == len(buffer):
                break
            line = buffer[: end.start()].decode("utf-8", errors="replace")
            buffer = buffer[end.end() :]
            if first:
                line = line.removeprefix("\ufeff")
                first = False
            yield line
    if buffer.endswith(b"\r"):
        yield buffer[:-1].decode("utf-8", errors="replace")


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"an event's data is not JSON ({exc}): {raw[:200]!r}"
        ) from None


def _before(
    deadline: float, timeout: float, chunks: Iterable[bytes]
) -> Iterator[bytes]:
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stream was still open after {timeout:.0f} s")
        yield chunk


def _pids_with_environment_entry(entry: bytes) -> Iterator[int]:
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            environ = Path("/proc", name, "environ").read_bytes()
        except OSError:
            # Gone already, or another user's process: not one of ours.
            continue
        if entry in environ.split(b"\0"):
            yield int(name)
