"""The `docker` backend: one locked-down container per session.

Lifecycle of `launch`, which runs in an RQ worker and blocks until the end:

1. Create the container from `settings.sandbox_image` with no network, a
   read-only root, tmpfs for `/tmp` and `/workspace`, a non-root user, every
   capability dropped, and the session's memory, CPU, pids and CPU-time limits.
   A session with egress also gets its egress directory (prepared by the
   worker's job, see `enclave.egress.sandbox`) bound read-only at
   `/run/enclave`, and the bootstrap starts the relay there before the code.
   It is labelled with the session and organisation so that `teardown`, from
   any process, can find it again.
2. Attach to its stdin, stdout and stderr *before* starting it, so that no
   output is lost, then start it. The container runs a fixed bootstrap program
   that reads a length-prefixed copy of the code from stdin, writes it to the
   working directory and execs the interpreter; whatever follows the code on
   stdin is the session's own stdin. The code never appears on a command line.
3. A writer thread sends code and stdin and then half-closes the connection,
   which closes the container's stdin. A reader thread splits the multiplexed
   stream into stdout and stderr and hands it to the sink as it arrives.
4. The calling thread waits for the streams to end, the wall clock to run out,
   the sink to refuse more output, or a teardown; in every case but the first it
   kills the container. The result is read from the container's state: the
   engine's own OOM flag, and the exit status of the workload as reported by
   the container's init process (128 + n when signal n ended it).
5. The container is removed and only then is the result reported, so that a
   finished session holds nothing on the engine.

A session with a git source first gets a checkout directory of its own on
the host, `<state_dir>/checkouts/<session_id>` (a tmpfs of `disk_mb` when the
worker is root: a docker volume of the `local` driver cannot be a tmpfs
that outlives one container), and an init container: the same
image and confinement, running the clone step to completion with that volume
bound at `/workspace`, the clone's own egress directory (prepared by the worker's
job, allowing the git host alone) at `/run/enclave`, and the token file's
directory at `/run/enclave-git`. Nothing else is shared: the workload
container then binds the checkout at `/workspace` (its working directory)
and gets its code in `/run/enclave-code`. The token file is deleted as soon
as the init container has exited; the clone's time counts against
`timeout_s`, and the workload gets what is left.

`teardown` renames every container of the session before removing it. A
`launch` running in another process cannot otherwise tell a teardown's kill
from any other SIGKILL; the new name, or the container being gone, tells it.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.types import LogConfig, Ulimit

from enclave.backends.base import (
    CLONE_EGRESS_SUFFIX,
    BackendEventSink,
    BackendHealth,
)
from enclave.backends.local import mount_checkout, remove_checkout
from enclave.broker.clone import (
    TOKEN_DIR,
    TOKEN_FILE_NAME,
    CloneStep,
    describe_clone_failure,
)
from enclave.egress import sandbox as egress
from enclave.errors import BackendError, BackendUnavailable
from enclave.sandbox import clone_step
from enclave.sessions.spec import (
    LANGUAGES,
    KillReason,
    LaunchSpec,
    Phase,
    SessionResult,
)

logger = logging.getLogger(__name__)

LABEL_MANAGED = "enclave.managed"
LABEL_SESSION = "enclave.session_id"
LABEL_ORG = "enclave.org_id"
LABEL_LANGUAGE = "enclave.language"
LABEL_ROLE = "enclave.role"

SANDBOX_UID = 1000
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
WORKDIR = "/workspace"
# With a git source the checkout is the working directory; the code goes here.
SOURCE_CODE_DIR = "/run/enclave-code"
# Under the state directory: where token files wait for their init container,
# and where the checkouts are.
TOKENS_DIR = "git-tokens"
CHECKOUTS_DIR = "checkouts"
# The clone step gets this much less than the time left, so that it reports
# its own timeout before its container has to be killed.
CLONE_GRACE_S = 2.0
TORN_DOWN_PREFIX = "enclave-torn-down-"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# The image's own PATH and LANG are repeated so that an image built some other
# way still gives the workload the same environment. Nothing of the worker's
# environment is ever passed on. The root is read-only, so HOME points at the
# writable working directory for tools that keep caches there.
SANDBOX_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": WORKDIR,
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}

# Runs inside the container as
# `python3 -I -S -c BOOTSTRAP <language> <code directory> [relay…]`.
# It reads "<length>\n" and then exactly that many bytes of code from stdin, one
# read at a time so that nothing beyond the code is consumed: the rest of stdin
# stays in the pipe for the interpreter it execs. With egress, the arguments
# after the language start the relay, which then execs the interpreter.
BOOTSTRAP = """\
import os
import sys

def take(count):
    data = bytearray()
    while len(data) < count:
        chunk = os.read(0, count - len(data))
        if not chunk:
            sys.exit("enclave: the session's code did not arrive")
        data += chunk
    return bytes(data)

header = bytearray()
while not header.endswith(b"\\n"):
    header += take(1)
code = take(int(header))
interpreter, name = {
    "python": ("/usr/bin/python3", "main.py"),
    "node": ("/usr/bin/node", "main.js"),
}[sys.argv[1]]
path = os.path.join(sys.argv[2], name)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with os.fdopen(fd, "wb") as target:
    target.write(code)
prefix = sys.argv[3:]
if prefix:
    os.execv(prefix[0], prefix + [interpreter, path])
os.execv(interpreter, [os.path.basename(interpreter), path])
"""
# The image's interpreter that runs the egress relay in front of the code.
RELAY_PYTHON = "/usr/bin/python3"

# Frames on an attached, non-TTY stream: stream id, three zero bytes, and the
# payload length as a big-endian 32-bit integer.
FRAME_HEADER_BYTES = 8
STREAM_STDOUT = 1
STREAM_STDERR = 2
READ_CHUNK_BYTES = 64 * 1024

# How long to wait for a container to die after a kill, and for the reader to
# drain what was already in flight, before giving up on either.
KILL_GRACE_S = 10.0
DRAIN_GRACE_S = 5.0


@dataclass
class _Run:
    """What a `launch` in this process shares with `teardown` and its threads."""

    session_id: str
    wake: threading.Event = field(default_factory=threading.Event)
    stop_reason: KillReason | None = None
    streams_closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, reason: KillReason) -> None:
        with self.lock:
            # A session whose streams already ended finished on its own; a
            # teardown arriving afterwards must not rewrite how it ended.
            if self.stop_reason is None and not self.streams_closed:
                self.stop_reason = reason
        self.wake.set()

    def close_streams(self) -> None:
        with self.lock:
            self.streams_closed = True
        self.wake.set()


class DockerBackend:
    """Runs each session in its own container on a Docker engine."""

    name = "docker"

    def __init__(self, settings) -> None:
        self.settings = settings
        self.image = settings.sandbox_image
        self._docker: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()

    # -- the protocol -----------------------------------------------------------

    def launch(
        self, spec: LaunchSpec, sink: BackendEventSink, *, credentials=None
    ) -> None:
        """Run the session; `credentials` (a `SessionCredentials`) for a git source.

        Only its `clone_proxy` (whose user names the clone's egress
        directory) and `git_token` are used: the workload's proxy
        credentials are in its own egress directory already.
        """
        run = _Run(spec.session_id)
        with self._runs_lock:
            self._runs[spec.session_id] = run
        try:
            result = self._launch(spec, sink, run, credentials)
        finally:
            with self._runs_lock:
                if self._runs.get(spec.session_id) is run:
                    del self._runs[spec.session_id]

        sink.result(result)

    def teardown(self, session_id: str) -> None:
        with self._runs_lock:
            run = self._runs.get(session_id)
        if run is not None:
            run.stop(KillReason.TEARDOWN)

        # What a job that died left of the session's egress directories.
        egress.remove_session_directory(self.settings, session_id)
        egress.remove_session_directory(self.settings, session_id + CLONE_EGRESS_SUFFIX)
        _remove_token_dir(self._token_dir(session_id))
        if _SAFE_ID.match(session_id):
            remove_checkout(self._checkout_dir(session_id))
        # TODO: a teardown from another process that lands before `launch` has
        # created the container finds nothing, and the session then runs to
        # its own end; closing that gap needs a tombstone both sides can see.
        with _engine_errors("tearing down a session"):
            containers = self._client().containers.list(
                all=True,
                filters={"label": f"{LABEL_SESSION}={session_id}"},
            )
            for container in containers:
                _mark_torn_down(container)
                _remove(container)
        if containers:
            logger.info(
                "session torn down session_id=%s backend=%s containers=%s",
                session_id,
                self.name,
                len(containers),
            )

    def health(self) -> BackendHealth:
        try:
            with _engine_errors("checking health"):
                client = self._client()
                client.ping()
                try:
                    client.images.get(self.image)
                except docker.errors.ImageNotFound:
                    return BackendHealth(ok=False, detail=_missing_image(self.image))
                version = client.version().get("Version", "unknown")
        except BackendError as exc:
            return BackendHealth(ok=False, detail=exc.message)

        return BackendHealth(ok=True, detail=f"engine {version}, image {self.image}")

    # -- launching ----------------------------------------------------------------

    def _launch(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        run: _Run,
        credentials=None,
    ) -> SessionResult:
        sink.phase(Phase.PROVISIONING)
        deadline = time.monotonic() + spec.limits.timeout_s
        if spec.language not in LANGUAGES:
            return SessionResult.failed(f"unsupported language {spec.language!r}")
        egress_dir = None
        if spec.egress.allow:
            egress_dir = egress.prepared_directory(self.settings, spec.session_id)
            if egress_dir is None:
                # Fail closed: the code must not run believing it has a network.
                return SessionResult.failed(
                    "the session's network access was not prepared"
                )
            egress.hand_over(egress_dir, SANDBOX_UID)
        if spec.source is None:
            return self._launch_workload(spec, sink, run, egress_dir, None)

        clone_proxy = getattr(credentials, "clone_proxy", None)
        clone_dir = None
        if clone_proxy is not None:
            clone_dir = egress.prepared_directory(self.settings, clone_proxy.username)
        if clone_dir is None:
            return SessionResult.failed(
                "the git source cannot be cloned: the clone step's network access "
                "was not prepared"
            )
        egress.hand_over(clone_dir, SANDBOX_UID)
        checkout = None
        try:
            checkout = self._create_checkout(spec)
            failed = self._clone(
                spec,
                run,
                checkout,
                clone_dir,
                getattr(credentials, "git_token", None),
                deadline,
            )
            if failed is not None:
                return failed
            left = max(1.0, deadline - time.monotonic())
            remaining = dataclasses.replace(
                spec, limits=dataclasses.replace(spec.limits, timeout_s=left)
            )
            return self._launch_workload(remaining, sink, run, egress_dir, checkout)
        except OSError as exc:
            logger.warning(
                "checkout not prepared session_id=%s backend=%s error=%s",
                spec.session_id,
                self.name,
                exc,
            )
            return SessionResult.failed("the session's checkout could not be prepared")
        except docker.errors.ImageNotFound:
            return SessionResult.failed(_missing_image(self.image))
        except BackendError as exc:
            logger.exception(
                "checkout not prepared session_id=%s backend=%s",
                spec.session_id,
                self.name,
            )
            return SessionResult.failed(exc.message)
        finally:
            if checkout is not None:
                remove_checkout(checkout)

    def _launch_workload(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        run: _Run,
        egress_dir: Path | None,
        checkout: Path | None,
    ) -> SessionResult:
        try:
            container = self._create(spec, egress_dir, checkout)
        except docker.errors.ImageNotFound:
            return SessionResult.failed(_missing_image(self.image))
        except BackendError as exc:
            logger.exception(
                "sandbox container not created session_id=%s backend=%s",
                spec.session_id,
                self.name,
            )
            return SessionResult.failed(exc.message)

        try:
            return self._run(spec, sink, run, container)
        except BackendError as exc:
            logger.exception(
                "sandbox container lost session_id=%s backend=%s",
                spec.session_id,
                self.name,
            )
            return SessionResult.failed(exc.message)
        finally:
            try:
                with _engine_errors("removing a finished container"):
                    _remove(container)
            except BackendError:
                # The session's outcome stands; a later teardown or the reaper
                # reclaims what is left.
                logger.warning(
                    "sandbox container not removed session_id=%s backend=%s",
                    spec.session_id,
                    self.name,
                    exc_info=True,
                )

    def _create(
        self,
        spec: LaunchSpec,
        egress_dir: Path | None = None,
        checkout: Path | None = None,
    ):
        limits = spec.limits
        disk = f"{max(1, int(limits.disk_mb))}m"
        code_dir = WORKDIR if checkout is None else SOURCE_CODE_DIR
        command = ["python3", "-I", "-S", "-c", BOOTSTRAP, spec.language, code_dir]
        volumes = {}
        tmpfs = {"/tmp": f"rw,nosuid,nodev,size={disk},mode=1777"}
        workspace = f"rw,nosuid,nodev,size={disk},uid=1000,gid=1000,mode=0755"
        if checkout is None:
            tmpfs[WORKDIR] = workspace
        else:
            # The checkout, sized by disk_mb when it was made.
            volumes[str(checkout)] = {"bind": WORKDIR, "mode": "rw"}
            tmpfs[SOURCE_CODE_DIR] = workspace
        if egress_dir is not None:
            # The directory, not the socket file: a socket bound into a
            # container stays the old inode if the file is ever replaced.
            volumes[str(egress_dir)] = {"bind": egress.MOUNT_POINT, "mode": "ro"}
            command += egress.relay_command(RELAY_PYTHON)
        cpu_seconds = max(1, math.ceil(limits.cpu_s))
        memory = f"{int(limits.memory_mb)}m"
        with _engine_errors("creating the sandbox container"):
            return self._client().containers.create(
                self.image,
                command=command,
                volumes=volumes,
                name=_container_name(spec.session_id),
                hostname="sandbox",
                user=SANDBOX_USER,
                working_dir=WORKDIR,
                environment=SANDBOX_ENVIRONMENT,
                labels={
                    LABEL_MANAGED: "true",
                    LABEL_SESSION: spec.session_id,
                    LABEL_ORG: spec.org_id,
                    LABEL_LANGUAGE: spec.language,
                },
                # Attached and interactive, so that stdin closes for good once
                # the code and the session's stdin have been sent.
                detach=False,
                stdin_open=True,
                tty=False,
                # Without this the client copies the proxy settings of the
                # worker's own Docker configuration into the sandbox.
                use_config_proxy=False,
                network_mode="none",
                read_only=True,
                tmpfs=tmpfs,
                shm_size=disk,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                init=True,
                pids_limit=int(limits.pids),
                mem_limit=memory,
                memswap_limit=memory,
                nano_cpus=int(limits.cpus * 1e9),
                ulimits=[
                    # SIGXCPU at the soft limit tells a CPU-time kill apart; the
                    # hard limit a second later ends a workload that ignores it.
                    Ulimit(name="cpu", soft=cpu_seconds, hard=cpu_seconds + 1),
                    # A core dump would fill the tmpfs or reach the host's
                    # core handler; neither is wanted.
                    Ulimit(name="core", soft=0, hard=0),
                    Ulimit(name="nofile", soft=4096, hard=4096),
                ],
                # Output reaches the sink through the attached stream; a log
                # file on the host would only keep a second, uncapped copy.
                log_config=LogConfig(type=LogConfig.types.NONE),
            )

    def _run(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        run: _Run,
        container,
    ) -> SessionResult:
        if run.stop_reason is KillReason.TEARDOWN:
            return SessionResult.killed(KillReason.TEARDOWN)

        connection = None
        try:
            with _engine_errors("starting the sandbox container"):
                connection = self._client().api.attach_socket(
                    container.id,
                    params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1},
                )
                container.start()
        except (BackendError, docker.errors.NotFound) as exc:
            if connection is not None:
                connection.close()
            if run.stop_reason is KillReason.TEARDOWN or _is_not_found(exc):
                return SessionResult.killed(KillReason.TEARDOWN)
            logger.exception(
                "sandbox container did not start session_id=%s backend=%s",
                spec.session_id,
                self.name,
            )
            return SessionResult.failed(exc.message)

        started = time.monotonic()
        logger.info(
            "session started session_id=%s org_id=%s backend=%s container=%s",
            spec.session_id,
            spec.org_id,
            self.name,
            container.short_id,
        )
        sink.phase(Phase.RUNNING)

        stream = _raw_socket(connection)
        payload = _framed_input(spec)
        writer = threading.Thread(
            target=_send_input,
            args=(stream, payload),
            name=f"enclave-stdin-{spec.session_id}",
            daemon=True,
        )
        reader = _OutputReader(stream, sink, run)
        writer.start()
        reader.start()
        try:
            return self._supervise(spec, run, container, reader, started)
        finally:
            with contextlib.suppress(OSError):
                stream.shutdown(socket.SHUT_RDWR)
            stream.close()
            with contextlib.suppress(OSError):
                connection.close()
            # The result follows; no output may reach the sink after it.
            reader.silence()

    def _supervise(
        self,
        spec: LaunchSpec,
        run: _Run,
        container,
        reader: _OutputReader,
        started: float,
    ) -> SessionResult:
        woke = run.wake.wait(spec.limits.timeout_s)
        reason = run.stop_reason if woke else KillReason.TIMEOUT
        status = None

        if reason is None:
            # The streams ended, so the workload is gone or going; its exit
            # status is what remains to learn.
            remaining = spec.limits.timeout_s - (time.monotonic() - started)
            status = _wait_for_exit(container, max(remaining, 1.0))
            if status is _STILL_RUNNING:
                reason = KillReason.TIMEOUT

        if reason is not None:
            delivered = _kill(container)
            status = _wait_for_exit(container, KILL_GRACE_S)
            reader.join(DRAIN_GRACE_S)
            # When the clock ran out but the kill was refused, the container
            # had already stopped by itself (at its CPU limit, say), and that
            # is the better account of it. A teardown or a refused output
            # stands whatever the kill found.
            if delivered or reason is not KillReason.TIMEOUT:
                code, number = _exit_status(status)
                return SessionResult.killed(
                    reason,
                    exit_code=code,
                    signal=number,
                    duration_ms=_elapsed_ms(started),
                )

        reader.join(DRAIN_GRACE_S)
        return _natural_result(container, status, _elapsed_ms(started))

    # -- the clone step -------------------------------------------------------------

    def _checkout_dir(self, session_id: str) -> Path:
        return Path(self.settings.state_dir) / CHECKOUTS_DIR / session_id

    def _create_checkout(self, spec: LaunchSpec) -> Path:
        """The session's empty checkout: a tmpfs of `disk_mb`, owned by the sandbox."""
        if not _SAFE_ID.match(spec.session_id):
            raise OSError("the session id is not usable as a directory name")
        path = self._checkout_dir(spec.session_id)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        remove_checkout(path)
        path.mkdir(mode=0o700)
        try:
            mount_checkout(path, spec.limits.disk_mb, SANDBOX_UID)
        except BaseException:
            remove_checkout(path)
            raise
        return path

    def _token_dir(self, session_id: str) -> Path:
        return Path(self.settings.state_dir) / TOKENS_DIR / session_id

    def _clone(
        self,
        spec: LaunchSpec,
        run: _Run,
        checkout: Path,
        clone_dir: Path,
        token: str | None,
        deadline: float,
    ) -> SessionResult | None:
        """Run the init container to its end; a result when the session cannot go on."""
        source = spec.source
        started = time.monotonic()
        step = CloneStep(
            url=source.url,
            ref=source.ref,
            dest=WORKDIR,
            timeout_s=max(1.0, deadline - started - CLONE_GRACE_S),
            token_file=f"{TOKEN_DIR}/{TOKEN_FILE_NAME}" if token else None,
            python=RELAY_PYTHON,
        )
        volumes = {
            str(checkout): {"bind": WORKDIR, "mode": "rw"},
            str(clone_dir): {"bind": egress.MOUNT_POINT, "mode": "ro"},
        }
        token_dir = self._token_dir(spec.session_id)
        if token:
            _write_token(token_dir, token)
            volumes[str(token_dir)] = {"bind": TOKEN_DIR, "mode": "ro"}
        limits = spec.limits
        memory = f"{int(limits.memory_mb)}m"
        container = None
        try:
            with _engine_errors("creating the clone container"):
                container = self._client().containers.create(
                    self.image,
                    command=egress.relay_command(RELAY_PYTHON) + step.argv(),
                    volumes=volumes,
                    name=_container_name(spec.session_id) + "-clone",
                    hostname="sandbox",
                    user=SANDBOX_USER,
                    working_dir="/",
                    environment={
                        "PATH": SANDBOX_ENVIRONMENT["PATH"],
                        "LANG": "C.UTF-8",
                    },
                    labels={
                        LABEL_MANAGED: "true",
                        LABEL_SESSION: spec.session_id,
                        LABEL_ORG: spec.org_id,
                        LABEL_ROLE: "clone",
                    },
                    use_config_proxy=False,
                    network_mode="none",
                    read_only=True,
                    tmpfs={"/tmp": "rw,nosuid,nodev,size=16m,mode=1777"},
                    cap_drop=["ALL"],
                    security_opt=["no-new-privileges"],
                    init=True,
                    pids_limit=int(limits.pids),
                    mem_limit=memory,
                    memswap_limit=memory,
                    nano_cpus=int(limits.cpus * 1e9),
                    ulimits=[Ulimit(name="core", soft=0, hard=0)],
                    # Its exit code is its whole report (see `clone_step`).
                    log_config=LogConfig(type=LogConfig.types.NONE),
                )
            status = self._wait_for_clone(container, run, deadline)
        finally:
            # The clone is over (or never ran): the token file goes now, and
            # the container with it.
            _remove_token_dir(token_dir)
            if container is not None:
                with (
                    contextlib.suppress(BackendError),
                    _engine_errors("removing the clone container"),
                ):
                    _remove(container)

        duration_ms = _elapsed_ms(started)
        if run.stop_reason is KillReason.TEARDOWN or status is None:
            return SessionResult.killed(KillReason.TEARDOWN, duration_ms=duration_ms)
        code = status if isinstance(status, int) else clone_step.EXIT_TIMEOUT
        if code == clone_step.EXIT_OK:
            logger.info(
                "clone finished session_id=%s backend=%s duration_ms=%s",
                spec.session_id,
                self.name,
                duration_ms,
            )
            return None
        logger.info(
            "clone failed session_id=%s backend=%s exit_code=%s duration_ms=%s",
            spec.session_id,
            self.name,
            code,
            duration_ms,
        )
        error = describe_clone_failure(
            code,
            url=source.url,
            ref=source.ref,
            timeout_s=step.timeout_s,
            with_token=token is not None,
        )
        return SessionResult.failed(error, duration_ms=duration_ms)

    def _wait_for_clone(self, container, run: _Run, deadline: float):
        """The init container's exit status, None if it is gone, else a sentinel.

        Waited for in short steps so that a teardown is noticed; on a
        teardown or at the deadline the container is killed.
        """
        if run.stop_reason is KillReason.TEARDOWN:
            return None
        with _engine_errors("starting the clone container"):
            container.start()
        status = _STILL_RUNNING
        while status is _STILL_RUNNING:
            left = deadline - time.monotonic()
            if run.stop_reason is not None or left <= 0:
                _kill(container)
                return None if run.stop_reason is KillReason.TEARDOWN else status
            status = _wait_for_exit(container, min(1.0, left))
        return status

    # -- the engine ---------------------------------------------------------------

    def _client(self) -> docker.DockerClient:
        with self._client_lock:
            if self._docker is None:
                try:
                    if self.settings.docker_url:
                        self._docker = docker.DockerClient(
                            base_url=self.settings.docker_url
                        )
                    else:
                        self._docker = docker.from_env()
                except docker.errors.DockerException as exc:
                    # The client asks the engine for its API version right away,
                    # so an engine that is down shows up here.
                    raise BackendUnavailable(
                        "the Docker engine cannot be reached"
                    ) from exc
            return self._docker


class _OutputReader(threading.Thread):
    """Demultiplexes the attached stream into the sink, as output arrives."""

    def __init__(self, stream: socket.socket, sink: BackendEventSink, run: _Run):
        super().__init__(name=f"enclave-output-{run.session_id}", daemon=True)
        self._stream = stream
        self._sink = sink
        self._run = run
        self._decoders = {
            STREAM_STDOUT: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            STREAM_STDERR: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._refused = False
        self._silenced = False
        self._emit_lock = threading.Lock()

    def silence(self) -> None:
        """Stop passing output on; returns once no sink call is in progress."""
        with self._emit_lock:
            self._silenced = True

    def run(self) -> None:
        pending = bytearray()
        try:
            while True:
                try:
                    data = self._stream.recv(READ_CHUNK_BYTES)
                except OSError:
                    # The socket was shut down by `launch` after a kill.
                    break
                if not data:
                    break
                pending += data
                self._deliver(pending)
            for stream_id, decoder in self._decoders.items():
                self._emit(stream_id, decoder.decode(b"", final=True))
        finally:
            self._run.close_streams()

    def _deliver(self, pending: bytearray) -> None:
        # Everything already received is passed on in one call per stream run,
        # so that a flood of tiny writes does not become a flood of events.
        batch: list[tuple[int, bytes]] = []
        while len(pending) >= FRAME_HEADER_BYTES:
            size = int.from_bytes(pending[4:FRAME_HEADER_BYTES], "big")
            if len(pending) < FRAME_HEADER_BYTES + size:
                break
            stream_id = pending[0]
            payload = bytes(pending[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + size])
            del pending[: FRAME_HEADER_BYTES + size]
            if stream_id not in self._decoders:
                continue
            if batch and batch[-1][0] == stream_id:
                batch[-1] = (stream_id, batch[-1][1] + payload)
            else:
                batch.append((stream_id, payload))
        for stream_id, payload in batch:
            self._emit(stream_id, self._decoders[stream_id].decode(payload))

    def _emit(self, stream_id: int, text: str) -> None:
        with self._emit_lock:
            if not text or self._refused or self._silenced:
                return
            if stream_id == STREAM_STDOUT:
                accepted = self._sink.stdout(text)
            else:
                accepted = self._sink.stderr(text)
            if not accepted:
                self._refused = True
        if not accepted:
            self._run.stop(KillReason.OUTPUT_LIMIT)


# A sentinel: the container still ran when a wait gave up.
_STILL_RUNNING = object()


def _framed_input(spec: LaunchSpec) -> bytes:
    code = spec.code.encode()
    stdin = (spec.stdin or "").encode()
    return b"%d\n" % len(code) + code + stdin


def _send_input(stream: socket.socket, payload: bytes) -> None:
    try:
        stream.sendall(payload)
        # Half-closing is how the engine learns that stdin is over; it then
        # closes the container's stdin, and the workload reads end-of-file.
        stream.shutdown(socket.SHUT_WR)
    except OSError:
        # The container ended before reading all of its stdin, or `launch`
        # closed the connection; either way nobody is left to read it.
        logger.debug("stdin not fully delivered", exc_info=True)


def _raw_socket(connection) -> socket.socket:
    """The plain socket under what `attach_socket` returns, without a timeout.

    The client's request timeout would otherwise end a quiet session's stream.
    """
    stream = getattr(connection, "_sock", connection)
    stream.settimeout(None)
    return stream


def _wait_for_exit(container, timeout_s: float):
    """The container's exit status code, None if it is gone, or `_STILL_RUNNING`."""
    try:
        with _engine_errors("waiting for the sandbox container"):
            try:
                outcome = container.wait(timeout=timeout_s)
            except requests.exceptions.RequestException as exc:
                # Over a unix socket the client reports its read timeout as a
                # connection error wrapping urllib3's timeout.
                if _is_read_timeout(exc):
                    return _STILL_RUNNING
                raise
    except docker.errors.NotFound:
        return None
    return outcome.get("StatusCode")


def _is_read_timeout(exc: requests.exceptions.RequestException) -> bool:
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args)


def _natural_result(container, status, duration_ms: int) -> SessionResult:
    if status is None or _is_gone(container):
        return SessionResult.killed(KillReason.TEARDOWN, duration_ms=duration_ms)

    code, number = _exit_status(status)
    # The engine sets the flag when any process of the container met the OOM
    # killer, so a workload that survived losing a child still counts as
    # stopped by its memory limit: its run did not go as written.
    if container.attrs["State"].get("OOMKilled"):
        return SessionResult.killed(
            KillReason.MEMORY,
            exit_code=code,
            signal=number,
            duration_ms=duration_ms,
        )
    if number == signal.SIGXCPU:
        return SessionResult.killed(
            KillReason.CPU,
            exit_code=code,
            signal=number,
            duration_ms=duration_ms,
        )
    # TODO: a workload that ignores SIGXCPU dies by SIGKILL at the hard CPU
    # limit one second later, which looks like any other SIGKILL here and is
    # reported as a failed exit rather than as killed/cpu.
    return SessionResult.exited(code, duration_ms=duration_ms).replace(signal=number)


def _exit_status(status) -> tuple[int | None, int | None]:
    """Exit code and the signal behind it, by the init process's 128 + n rule.

    A workload calling exit(128 + n) itself is indistinguishable from one that
    signal n ended; the init process reports both the same way.
    """
    if not isinstance(status, int):
        return None, None
    if 128 < status < 128 + signal.NSIG:
        return status, status - 128
    return status, None


def _is_gone(container) -> bool:
    """Reload the container; True when it was removed or marked by a teardown."""
    try:
        with _engine_errors("inspecting the sandbox container"):
            container.reload()
    except docker.errors.NotFound:
        return True
    except BackendError as exc:
        if _is_not_found(exc):
            return True
        raise
    return container.name.startswith(TORN_DOWN_PREFIX)


def _kill(container) -> bool:
    """SIGKILL the container; False when it had already stopped or gone."""
    try:
        with _engine_errors("killing the sandbox container"):
            container.kill()
    except docker.errors.NotFound:
        return False
    except BackendError as exc:
        # 409: it had already stopped, which is all a kill wants.
        if _is_status(exc, 409):
            return False
        raise
    return True


def _mark_torn_down(container) -> None:
    if container.name.startswith(TORN_DOWN_PREFIX):
        return
    try:
        container.rename(f"{TORN_DOWN_PREFIX}{container.id[:24]}")
    except docker.errors.APIError as exc:
        # Another teardown renamed or removed it first; removal still follows.
        logger.debug("container not renamed: %s", exc)


def _remove(container) -> None:
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        # 409: a removal started by someone else is already under way.
        if exc.status_code != 409:
            raise


def _write_token(directory: Path, token: str) -> None:
    """The token in `directory/token`, readable by the sandbox's uid alone.

    The directory is the only thing bound into the init container for it,
    and nothing else ever mounts it.
    """
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_token_dir(directory)
    directory.mkdir(mode=0o700)
    path = directory / TOKEN_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    if os.geteuid() == 0:
        os.chown(path, SANDBOX_UID, SANDBOX_UID)
        os.chown(directory, SANDBOX_UID, SANDBOX_UID)


def _remove_token_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _container_name(session_id: str) -> str:
    """A readable, unique name; labels, not the name, identify the session."""
    readable = re.sub(r"[^a-zA-Z0-9_.-]", "-", session_id)[:40]
    return f"enclave-{readable}-{secrets.token_hex(3)}"


def _missing_image(image: str) -> str:
    return (
        f"the sandbox image {image} is not present on the Docker engine; "
        "build it with enclave/sandbox/build-image.sh"
    )


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _is_status(exc: BaseException, status: int) -> bool:
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return isinstance(cause, docker.errors.APIError) and cause.status_code == status


def _is_not_found(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return isinstance(cause, docker.errors.NotFound)


@contextlib.contextmanager
def _engine_errors(action: str) -> Iterator[None]:
    """Turn the client's errors into the project's, keeping them as the cause.

    A missing image or container passes through unchanged: callers treat those
    as answers, not failures.
    """
    try:
        yield
    except (docker.errors.ImageNotFound, docker.errors.NotFound):
        raise
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    ) as exc:
        raise BackendUnavailable(
            f"the Docker engine cannot be reached while {action}"
        ) from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"Docker failed while {action}: {exc.explanation}") from exc
    except docker.errors.DockerException as exc:
        raise BackendError(f"Docker failed while {action}: {exc}") from exc
