"""What Enclave adds to a real sandbox, measured against the same sandbox alone.

Run from the repository root::

    .venv/bin/python -m bench.sandboxes            # the full run
    .venv/bin/python -m bench.sandboxes --quick    # a small one, to try it out
    .venv/bin/python -m bench.sandboxes --backends docker --languages python

It starts a throwaway Redis and PostgreSQL, then for each backend in turn
(`local`, then `docker`) the service the way a deployment runs it
(`tests.stack.ServiceStack`: the migrations, gunicorn with gevent workers, RQ
workers and the reaper) on that backend, and measures from this process:

1. Latency, one session at a time. For each language, `print(1)` (or
   `console.log(1)`) through the whole service, timed from just before
   `POST /sessions` until its `result` event arrives on the session's stream,
   and the same one-liner in the raw sandbox with nothing of Enclave around
   it: for `local`, bubblewrap started directly with new namespaces, the same
   root filesystem read-only and a tmpfs on /tmp; for `docker`, create, start,
   wait, logs and remove of a container of the same image without a network.
   Service and raw runs alternate, so that whatever else loads the machine
   weighs on both alike. A run counts only when it printed `1` and exited 0.
2. Throughput. Python sessions through the service from 1, 2, 4 client
   threads (one organisation each), and the sessions per second each level
   achieved over its wall-clock time.

It prints what it measured and asserts nothing; failures are counted and
shown next to the figures.

Lifecycle: every server, stack and clean-up step is handed to an exit stack
as soon as it exists, so an error, Ctrl+C or SIGTERM stops everything this run
started. Once a stack is stopped, sessions that never reported a result are
torn down through their backend, and containers labelled as this run's (the
raw ones by `enclave.bench.run`, the service's by the organisations this run
made up) are removed. Once clean-up begins a further Ctrl+C is ignored. Every
loop is bounded by a count and every request, process and container wait by
a timeout; client threads are daemons.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import docker
import docker.errors
import requests

from bench.control_plane import (
    REQUEST_TIMEOUT_S,
    STACK_ENV,
    TOKEN_TTL_S,
    Claims,
    Measurement,
    Record,
    _bind,
    _ignore_interrupts,
    _interrupt,
    _levels,
    _ms,
    _non_negative_int,
    _positive_float,
    _positive_int,
    _postgres_version,
    _redis_version,
    _version,
    percentile,
    print_problems,
    run_threads,
    say,
)
from enclave.backends import create_backend
from enclave.backends.docker import LABEL_MANAGED, LABEL_ORG
from enclave.config import Settings
from tests.servers import PostgresServer, RedisServer, ServerError
from tests.stack import ServiceStack, StackError

logger = logging.getLogger(__name__)

BACKENDS = ("local", "docker")
LANGUAGES = ("python", "node")
ONE_LINERS = {"python": "print(1)", "node": "console.log(1)"}
EXPECTED_OUTPUT = "1\n"
# The raw runs hand the one-liner to the interpreter on its command line; the
# service writes it to a file first, which costs nothing worth measuring here.
RAW_COMMANDS = {
    "python": ("python3", "-c", ONE_LINERS["python"]),
    "node": ("node", "-e", ONE_LINERS["node"]),
}
VERSION_COMMANDS = {"python": ("python3", "--version"), "node": ("node", "--version")}
THROUGHPUT_LANGUAGE = "python"

FULL_RUN = {"runs": 30, "concurrency": (1, 2, 4), "warmup": 2}
QUICK_RUN = {"runs": 8, "concurrency": (1, 2), "warmup": 1}

DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
ROOTFS_RECIPE = "etc/enclave-sandbox-recipe"
IMAGE_RECIPE_LABEL = "org.enclave.sandbox.recipe"
BENCH_LABEL = "enclave.bench.run"
RAW_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

HEALTH_TIMEOUT_S = 90.0
LEVEL_TIMEOUT_S = 600.0
DOCKER_API_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 10.0


class Unavailable(Exception):
    """A backend cannot be measured on this machine; the message says why."""


class RawSandbox(Protocol):
    """The sandbox of one backend started directly, without the service."""

    def run(self, command: Sequence[str], timeout_s: float) -> tuple[int, str]:
        """Run `command` in a fresh sandbox; its exit status and merged output."""


@dataclass(frozen=True)
class BwrapSandbox:
    """bwrap alone: new namespaces, the root filesystem read-only, tmpfs /tmp.

    It leaves out what the local backend adds around the same bwrap: the
    per-session host uid, the cgroup, rlimits, size limits on the tmpfs
    mounts, the memfds carrying code and files, and the output relay.
    """

    bwrap: str
    rootfs: str

    def argv(self, command: Sequence[str]) -> list[str]:
        return [
            self.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            self.rootfs,
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--chdir",
            "/tmp",
            "--clearenv",
            "--setenv",
            "PATH",
            RAW_PATH,
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--setenv",
            "HOME",
            "/tmp",
            *command,
        ]

    def run(self, command: Sequence[str], timeout_s: float) -> tuple[int, str]:
        # On a timeout `subprocess.run` kills bwrap, and --die-with-parent
        # takes the sandbox down with it.
        completed = subprocess.run(
            self.argv(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={},
            timeout=timeout_s,
            check=False,
        )
        return completed.returncode, completed.stdout.decode(errors="replace")


@dataclass(frozen=True)
class ContainerSandbox:
    """One container of the image per run, as `containers.run` would make it.

    Only the network is taken away; the docker backend's read-only root,
    tmpfs mounts, user, dropped capabilities, limits and attached streams are
    left out, and the output is read back from the engine's log instead.
    """

    client: docker.DockerClient
    image: str
    run_id: str

    def run(self, command: Sequence[str], timeout_s: float) -> tuple[int, str]:
        container = self.client.containers.create(
            self.image,
            command=list(command),
            network_mode="none",
            labels={BENCH_LABEL: self.run_id},
            use_config_proxy=False,
        )
        try:
            container.start()
            status = container.wait(timeout=timeout_s)
            output = container.logs(stdout=True, stderr=True)
        finally:
            # Inside the timed span: the service removes its container before
            # it reports the result, too.
            container.remove(force=True)
        return status.get("StatusCode", -1), output.decode(errors="replace")


@dataclass(frozen=True)
class Target:
    """One backend: how the service is set up for it, and its raw twin."""

    backend: str
    env: dict[str, str]
    sandbox: RawSandbox
    sandbox_note: str
    raw_note: str
    settings: Settings


@dataclass
class SessionRecord(Record):
    """A `Record` that also keeps the sandbox run time each result reported."""

    run_ms: list[float] = field(default_factory=list)


@dataclass
class Pending:
    """Sessions created on a stack that have not reported a result yet."""

    ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, session_id: str) -> None:
        with self.lock:
            self.ids.add(session_id)

    def discard(self, session_id: str) -> None:
        with self.lock:
            self.ids.discard(session_id)

    def take(self) -> list[str]:
        with self.lock:
            taken, self.ids = sorted(self.ids), set()
        return taken


@dataclass(frozen=True)
class Latency:
    service: SessionRecord
    raw: Record


def service_session(
    stack: ServiceStack,
    client: requests.Session,
    token: str,
    language: str,
    timeout_s: float,
    record: Record,
    pending: Pending,
) -> None:
    """One one-liner through the service, timed from POST to its `result` event."""
    body = {"language": language, "code": ONE_LINERS[language]}
    started = time.perf_counter()
    try:
        response = client.post("/sessions", json=body)
        posted = time.perf_counter()
        if response.status_code != 201:
            record.errors[f"POST /sessions answered {response.status_code}"] += 1
            return
        session_id = response.json()["id"]
        pending.add(session_id)
        events = stack.stream(session_id, token, timeout=timeout_s)
        with contextlib.closing(events):
            for event in events:
                if event.event == "result":
                    finished = time.perf_counter()
                    result = event.data
                    break
            else:
                record.errors["the stream closed without a result event"] += 1
                return
        pending.discard(session_id)
    except (requests.RequestException, StackError, TimeoutError, ValueError) as exc:
        # Counted, not raised: a benchmark reports failures next to the figures.
        record.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
        return

    problem = _unexpected_result(result)
    if problem:
        record.errors[problem] += 1
        return
    record.post_ms.append((posted - started) * 1000)
    record.done_ms.append((finished - started) * 1000)
    if isinstance(record, SessionRecord) and result.get("duration_ms") is not None:
        record.run_ms.append(float(result["duration_ms"]))


def raw_run(
    sandbox: RawSandbox, language: str, timeout_s: float, record: Record
) -> None:
    """The same one-liner in the raw sandbox, timed around the whole run."""
    started = time.perf_counter()
    try:
        status, output = sandbox.run(RAW_COMMANDS[language], timeout_s)
    except (
        OSError,
        subprocess.SubprocessError,
        docker.errors.DockerException,
        requests.RequestException,
    ) as exc:
        # Counted like a failed session, for the same reason.
        record.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
        return
    finished = time.perf_counter()

    if status != 0 or output != EXPECTED_OUTPUT:
        record.errors[f"exit status {status}, output {output[:120]!r}"] += 1
        return
    record.done_ms.append((finished - started) * 1000)


def measure_latency(
    stack: ServiceStack,
    target: Target,
    language: str,
    runs: int,
    timeout_s: float,
    org_id: str,
    pending: Pending,
) -> Latency:
    """`runs` service sessions and `runs` raw runs, one at a time, alternating."""
    service, raw = SessionRecord(), Record()
    token = stack.token(org_id, ttl=TOKEN_TTL_S)
    with stack.client(token, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(runs):
            service_session(stack, client, token, language, timeout_s, service, pending)
            raw_run(target.sandbox, language, timeout_s, raw)

    return Latency(service, raw)


def measure_throughput(
    stack: ServiceStack,
    concurrency: int,
    count: int,
    timeout_s: float,
    org_prefix: str,
    pending: Pending,
) -> Measurement:
    """`count` Python sessions shared out among `concurrency` client threads."""
    claims = Claims(count)
    records = [Record() for _ in range(concurrency)]
    # One org per thread, each holding one active session at a time: far
    # below the per-org quota, which is not what is measured here.
    tokens = [
        stack.token(f"{org_prefix}_c{index}", ttl=TOKEN_TTL_S)
        for index in range(concurrency)
    ]
    deadline = time.monotonic() + LEVEL_TIMEOUT_S

    def client_loop(stop: threading.Event, record: Record, token: str) -> None:
        with stack.client(token, timeout=REQUEST_TIMEOUT_S) as client:
            while not stop.is_set() and time.monotonic() < deadline and claims.take():
                service_session(
                    stack,
                    client,
                    token,
                    THROUGHPUT_LANGUAGE,
                    timeout_s,
                    record,
                    pending,
                )

    targets = [
        _bind(client_loop, record, token) for record, token in zip(records, tokens)
    ]
    join_by = deadline + REQUEST_TIMEOUT_S + timeout_s
    wall_s, unfinished = run_threads(targets, join_by)

    return Measurement(Record.merged(records), wall_s, 0.0, unfinished)


def local_target(state_dir: Path) -> Target:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise Unavailable("bwrap is not installed (Debian package bubblewrap)")
    rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
    if not os.path.isdir(rootfs):
        raise Unavailable(
            f"no sandbox root filesystem at {rootfs}; build one with "
            f"`enclave/sandbox/build-image.sh --rootfs {rootfs}` or point "
            "ENCLAVE_TEST_SANDBOX_ROOTFS at one"
        )

    try:
        recipe = Path(rootfs, ROOTFS_RECIPE).read_text().strip()[:12]
    except OSError:
        recipe = "unknown"
    sandbox = BwrapSandbox(bwrap, rootfs)
    raw_note = (
        f"{_first_line(_command_output([bwrap, '--version']))} alone, as "
        f"{'root' if os.geteuid() == 0 else 'this user'}: new user, pid, net, "
        "ipc, uts and cgroup namespaces, the same root read-only, tmpfs /tmp"
    )
    return Target(
        backend="local",
        env={"ENCLAVE_SANDBOX_ROOTFS": rootfs},
        sandbox=sandbox,
        sandbox_note=f"root filesystem {rootfs} (recipe {recipe})",
        raw_note=raw_note,
        settings=Settings(
            backend="local", state_dir=str(state_dir), sandbox_rootfs=rootfs
        ),
    )


def docker_target(state_dir: Path, run_id: str) -> tuple[Target, docker.DockerClient]:
    image = Settings.sandbox_image
    try:
        client = docker.from_env(timeout=DOCKER_API_TIMEOUT_S)
        client.ping()
        engine = client.version()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise Unavailable(f"the Docker engine cannot be reached: {exc}") from exc
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        client.close()
        raise Unavailable(
            f"the image {image} is not on the engine; build it with "
            "`enclave/sandbox/build-image.sh`"
        ) from None

    recipe = (found.labels or {}).get(IMAGE_RECIPE_LABEL, "unknown")[:12]
    target = Target(
        backend="docker",
        env={"ENCLAVE_SANDBOX_IMAGE": image},
        sandbox=ContainerSandbox(client, image, run_id),
        sandbox_note=(
            f"image {image} ({found.short_id}, recipe {recipe}) on engine "
            f"{engine.get('Version', 'unknown')} (API {engine.get('ApiVersion')})"
        ),
        raw_note=(
            f"Docker SDK {_version('docker')}: create, start, wait, logs, remove; "
            "network none, everything else the engine's defaults"
        ),
        settings=Settings(
            backend="docker", state_dir=str(state_dir), sandbox_image=image
        ),
    )
    return target, client


def reclaim(
    target_settings: Settings,
    pending: Pending,
    client: docker.DockerClient | None,
    run_id: str,
    org_prefix: str,
) -> None:
    """Take away whatever sandboxes this run's sessions and raw runs left behind."""
    leftovers = pending.take()
    if leftovers:
        backend = create_backend(target_settings)
        for session_id in leftovers:
            try:
                backend.teardown(session_id)
            except Exception:
                # Clean-up goes on with the next one; the log says what was left.
                logger.exception("teardown failed session_id=%s", session_id)
        logger.info("torn down sessions without a result count=%s", len(leftovers))
    if client is not None:
        remove_containers(client, run_id, org_prefix)


def remove_containers(
    client: docker.DockerClient, run_id: str, org_prefix: str
) -> None:
    """Remove the raw runs' containers and the service's containers for our orgs."""
    try:
        raw = client.containers.list(
            all=True, filters={"label": f"{BENCH_LABEL}={run_id}"}
        )
        managed = client.containers.list(
            all=True, filters={"label": f"{LABEL_MANAGED}=true"}
        )
    except (docker.errors.DockerException, requests.RequestException) as exc:
        logger.error("containers of this run could not be listed: %s", exc)
        return
    # Other deployments may share the engine: only our organisations' go.
    ours = [
        container
        for container in managed
        if container.labels.get(LABEL_ORG, "").startswith(org_prefix)
    ]
    for container in raw + ours:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.RequestException) as exc:
            logger.error("container %s not removed: %s", container.short_id, exc)
    if raw or ours:
        logger.info("removed leftover containers count=%s", len(raw) + len(ours))


def interpreter_versions(sandbox: RawSandbox, languages: Sequence[str]) -> str:
    found = []
    for language in languages:
        try:
            status, output = sandbox.run(VERSION_COMMANDS[language], COMMAND_TIMEOUT_S)
        except (
            OSError,
            subprocess.SubprocessError,
            docker.errors.DockerException,
            requests.RequestException,
        ) as exc:
            found.append(f"{language} unknown ({type(exc).__name__})")
            continue
        if status != 0:
            found.append(f"{language} unknown (exit status {status})")
            continue
        # `python3 --version` names itself, `node --version` does not.
        version = _first_line(output).removeprefix("Python ")
        found.append(f"{language} {version}")

    return ", ".join(found)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sandboxes",
        description=(
            "Start the service on the local and docker backends and print how "
            "long a one-liner takes through it and in the bare sandbox."
        ),
    )
    parser.add_argument(
        "--backends",
        type=_choices(BACKENDS),
        default=BACKENDS,
        help="comma-separated backends to measure (default local,docker)",
    )
    parser.add_argument(
        "--languages",
        type=_choices(LANGUAGES),
        default=LANGUAGES,
        help="comma-separated languages of the latency runs (default python,node)",
    )
    parser.add_argument(
        "--runs",
        type=_positive_int,
        help=(
            "runs per backend and language, each through the service and raw, "
            f"and sessions per concurrency level (default {FULL_RUN['runs']})"
        ),
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        help="comma-separated client thread counts for sessions/s (default 1,2,4)",
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=2, help="RQ workers (default 2)"
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        help=(
            "runs per backend and language, service and raw, before measuring "
            f"and not counted (default {FULL_RUN['warmup']})"
        ),
    )
    parser.add_argument(
        "--session-timeout-s",
        type=_positive_float,
        default=60.0,
        help="give up on one session or raw run after this long (default 60)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run: 8 runs each, concurrency 1,2, 1 warm-up",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the working directory with the service's logs",
    )
    args = parser.parse_args(argv)

    # Flags given explicitly win over both presets.
    preset = QUICK_RUN if args.quick else FULL_RUN
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _interrupt)

    cleanup = contextlib.ExitStack()
    try:
        try:
            measured_all = benchmark(args, cleanup)
        finally:
            # From here on a Ctrl+C must not cut clean-up short: an impatient
            # second press would leave servers or containers behind.
            _ignore_interrupts()
            cleanup.close()
    except KeyboardInterrupt:
        logger.warning("interrupted; everything this run started is stopped")
        return 130
    except ServerError as exc:
        logger.error("Redis or PostgreSQL could not be brought up: %s", exc)
        return 1

    return 0 if measured_all else 1


def benchmark(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> bool:
    """Measure every backend asked for; False when one could not be measured."""
    workdir = Path(tempfile.mkdtemp(prefix="enclave-bench-sandboxes-"))
    if args.keep_logs:
        cleanup.callback(logger.info, "service logs kept in %s", workdir)
    else:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
    run_id = secrets.token_hex(4)

    redis_server = RedisServer()
    cleanup.callback(redis_server.stop)
    redis_server.start()
    postgres_server = PostgresServer()
    cleanup.callback(postgres_server.stop)
    postgres_server.start()

    print_header(args, postgres_server.url, redis_server.url)
    summary: list[tuple[str, str, Latency]] = []
    measured_all = True
    for backend in args.backends:
        try:
            summary += measure_backend(
                args, backend, postgres_server, redis_server, workdir, run_id, cleanup
            )
        except (Unavailable, StackError) as exc:
            measured_all = False
            logger.error("backend %s not measured: %s", backend, exc)
            say()
            say(f"== {backend}: not measured: {str(exc).splitlines()[0]}")

    print_summary(summary)
    return measured_all


def measure_backend(
    args: argparse.Namespace,
    backend: str,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    workdir: Path,
    run_id: str,
    cleanup: contextlib.ExitStack,
) -> list[tuple[str, str, Latency]]:
    """Bring the service up on `backend`, measure it, and take it all down again."""
    # A clean-up of its own, so that one backend's stack is gone before the
    # next one starts and the two never compete for the machine. The run's
    # clean-up closes it too: after Ctrl+C that happens with interrupts
    # ignored, which closing it here could not promise.
    backend_cleanup = contextlib.ExitStack()
    cleanup.callback(backend_cleanup.close)
    try:
        latencies = measure_on_stack(
            args,
            backend,
            postgres_server,
            redis_server,
            workdir,
            run_id,
            backend_cleanup,
        )
    except Exception:
        backend_cleanup.close()
        raise
    backend_cleanup.close()

    return latencies


def measure_on_stack(
    args: argparse.Namespace,
    backend: str,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    workdir: Path,
    run_id: str,
    cleanup: contextlib.ExitStack,
) -> list[tuple[str, str, Latency]]:
    stack_dir = workdir / backend
    stack_dir.mkdir()
    client = None
    if backend == "local":
        target = local_target(stack_dir / "state")
    else:
        target, client = docker_target(stack_dir / "state", run_id)
        cleanup.callback(client.close)
    org_prefix = f"org_bench_{run_id}_{backend}"
    pending = Pending()
    # Registered before the stack, so it runs after the stack has stopped and
    # no worker can start another sandbox behind its back.
    cleanup.callback(reclaim, target.settings, pending, client, run_id, org_prefix)

    stack = ServiceStack(
        database_url=postgres_server.url_for(postgres_server.create_database()),
        redis_url=redis_server.url,
        workdir=stack_dir,
        workers=args.workers,
        backend=backend,
        env={**STACK_ENV, **target.env},
    )
    cleanup.callback(stack.stop)
    stack.start()
    health = stack.wait_healthy(HEALTH_TIMEOUT_S)

    print_backend(target, health["backend"].get("detail", ""))
    for language in args.languages:
        if args.warmup:
            logger.info(
                "warming up backend=%s language=%s runs=%s",
                backend,
                language,
                args.warmup,
            )
            measure_latency(
                stack,
                target,
                language,
                args.warmup,
                args.session_timeout_s,
                f"{org_prefix}_warmup",
                pending,
            )

    say()
    say(
        f"one at a time, {args.runs} runs per language, service and raw "
        "alternating (ms)"
    )
    say(
        f"  {'language':<8} {'measured':<11} {'done':>5} {'failed':>6} "
        f"{'p50':>8} {'p90':>8} {'POST p50':>9} {'run p50':>8}"
    )
    latencies = []
    for language in args.languages:
        logger.info(
            "measuring latency backend=%s language=%s runs=%s",
            backend,
            language,
            args.runs,
        )
        latency = measure_latency(
            stack,
            target,
            language,
            args.runs,
            args.session_timeout_s,
            f"{org_prefix}_latency",
            pending,
        )
        print_latency(language, latency)
        latencies.append((backend, language, latency))

    say()
    say(
        f"sessions/s through the service, {THROUGHPUT_LANGUAGE}, "
        f"{args.runs} sessions per level, {args.workers} RQ workers"
    )
    say(
        f"  {'clients':>7} {'done':>5} {'failed':>6} {'p50':>8} {'p90':>8} "
        f"{'sessions/s':>10}"
    )
    for concurrency in args.concurrency:
        logger.info(
            "measuring throughput backend=%s concurrency=%s sessions=%s",
            backend,
            concurrency,
            args.runs,
        )
        level = measure_throughput(
            stack,
            concurrency,
            args.runs,
            args.session_timeout_s,
            org_prefix,
            pending,
        )
        print_level(concurrency, level)

    return latencies


def print_header(args: argparse.Namespace, database_url: str, redis_url: str) -> None:
    affinity = len(os.sched_getaffinity(0))
    # Client, service and sandboxes share the machine with whatever else runs
    # there, which skews every figure: say how busy it was.
    say("Enclave sandbox benchmark: the service against the bare sandbox")
    say(
        f"  machine       {os.cpu_count()} CPUs ({affinity} usable by this process), "
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    say(f"  load average  {_load()} (1, 5, 15 min) at the start")
    say(
        f"  service       gunicorn {_version('gunicorn')} (gevent), "
        f"{args.workers} RQ workers (rq {_version('rq')}; a forked work horse "
        "per job), the reaper; ENCLAVE_ENV=production defaults, log level INFO"
    )
    say(
        f"  stores        PostgreSQL {_postgres_version(database_url)} (throwaway, "
        f"fsync off), {_redis_version(redis_url)} (throwaway)"
    )
    say(
        f"  code          {ONE_LINERS['python']!r} (python), "
        f"{ONE_LINERS['node']!r} (node); a run counts when it printed 1 and "
        "exited 0"
    )
    say(
        f"  client        this process, on the same machine; {args.warmup} "
        "warm-up runs per backend and language not counted"
    )


def print_backend(target: Target, health: str) -> None:
    say()
    say(f"== {target.backend} ==")
    say(f"  sandbox       {target.sandbox_note}")
    say(f"  interpreters  {interpreter_versions(target.sandbox, LANGUAGES)}")
    say(f"  service       {target.backend} backend; /healthz: {health}")
    say(f"  raw           {target.raw_note}")
    say(f"  load average  {_load()} when this backend began")


def print_latency(language: str, latency: Latency) -> None:
    service, raw = latency.service, latency.raw
    rows = (("service", service, service.post_ms, service.run_ms), ("raw", raw, [], []))
    for name, record, post_ms, run_ms in rows:
        say(
            f"  {language:<8} {name:<11} {len(record.done_ms):>5} "
            f"{sum(record.errors.values()):>6} "
            f"{_ms(percentile(record.done_ms, 0.5)):>8} "
            f"{_ms(percentile(record.done_ms, 0.9)):>8} "
            f"{_ms(percentile(post_ms, 0.5)):>9} "
            f"{_ms(percentile(run_ms, 0.5)):>8}"
        )
        for problem, count in record.errors.most_common(3):
            say(f"      {count} x {problem}")
    say(
        f"  {language:<8} {'service/raw':<11} {'':>5} {'':>6} "
        f"{_ratio(service.done_ms, raw.done_ms, 0.5):>8} "
        f"{_ratio(service.done_ms, raw.done_ms, 0.9):>8}"
    )


def print_level(concurrency: int, level: Measurement) -> None:
    record = level.record
    done = len(record.done_ms)
    rate = done / level.wall_s if level.wall_s > 0 else 0.0
    say(
        f"  {concurrency:>7} {done:>5} {sum(record.errors.values()):>6} "
        f"{_ms(percentile(record.done_ms, 0.5)):>8} "
        f"{_ms(percentile(record.done_ms, 0.9)):>8} {rate:>10.2f}"
    )
    print_problems(level)


def print_summary(summary: Sequence[tuple[str, str, Latency]]) -> None:
    if not summary:
        return
    say()
    say("summary, one at a time (ms)")
    say(
        f"  {'backend':<8} {'language':<8} {'service p50':>11} {'p90':>8} "
        f"{'raw p50':>8} {'p90':>8} {'ratio p50':>9} {'p90':>6}"
    )
    for backend, language, latency in summary:
        service, raw = latency.service.done_ms, latency.raw.done_ms
        say(
            f"  {backend:<8} {language:<8} "
            f"{_ms(percentile(service, 0.5)):>11} {_ms(percentile(service, 0.9)):>8} "
            f"{_ms(percentile(raw, 0.5)):>8} {_ms(percentile(raw, 0.9)):>8} "
            f"{_ratio(service, raw, 0.5):>9} {_ratio(service, raw, 0.9):>6}"
        )
    say(f"  load average  {_load()} at the end")


def _ratio(service: Sequence[float], raw: Sequence[float], fraction: float) -> str:
    top, bottom = percentile(service, fraction), percentile(raw, fraction)
    if top is None or not bottom:
        return "-"

    return f"{top / bottom:.1f}x"


def _unexpected_result(result: dict) -> str | None:
    """Why a session's result does not count as a run of the one-liner, or None."""
    if result.get("phase") != "succeeded":
        detail = result.get("error") or result.get("kill_reason") or ""
        return f"session {result.get('phase')} {detail}".strip()[:200]
    if result.get("stdout") != EXPECTED_OUTPUT:
        return f"session printed {str(result.get('stdout'))[:120]!r}"

    return None


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _command_output(argv: Sequence[str]) -> str:
    try:
        completed = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"

    return completed.stdout.decode(errors="replace")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()

    return lines[0] if lines else "unknown"


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [part for part in chosen if part not in allowed]
        if not chosen or unknown:
            raise argparse.ArgumentTypeError(
                f"give one or more of {','.join(allowed)}, comma-separated"
            )
        # Duplicates would only measure the same thing twice.
        return tuple(dict.fromkeys(chosen))

    return parse


if __name__ == "__main__":
    sys.exit(main())
