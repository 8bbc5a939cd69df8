"""How fast the control plane turns sessions around, measured on the real processes.

Run from the repository root::

    .venv/bin/python -m bench.control_plane            # the full run
    .venv/bin/python -m bench.control_plane --quick    # a small one, to try it out

It starts a throwaway Redis (and PostgreSQL, unless `--database sqlite`),
then the service the way a deployment runs it (`tests.stack.ServiceStack`:
the migrations, gunicorn with gevent workers, RQ workers and the reaper) on
the simulator backend, and drives it from client threads in this process:

1. Session latency. For each concurrency level, K sessions of `#sim exit 0`
   shared out among that many client threads, each timed from just before
   `POST /sessions` until its `result` event arrives on
   `GET /sessions/{id}/stream`, which the client opens as soon as the POST
   answers. Also the sessions per second the level achieved, over its
   wall-clock time.
2. Read throughput. `GET /sessions/{id}` of one finished session from M
   threads, each with a keep-alive connection of its own, for a fixed time.

It prints what it measured and asserts nothing; failed requests are counted
and shown next to the figures.

Lifecycle: every server and the stack are handed to clean-up as soon as
they exist, so an error, Ctrl+C or SIGTERM stops everything this run
started; once clean-up begins a further Ctrl+C is ignored, so an impatient
second press cannot leave a server behind. Client threads are daemons and
every loop they run is bounded by a count, a deadline and per-request
timeouts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis
import requests

from enclave.config import Settings
from tests.servers import PostgresServer, RedisServer, ServerError
from tests.stack import ServiceStack, StackError

logger = logging.getLogger(__name__)

SESSION_CODE = "#sim exit 0"
FULL_RUN = {"sessions": 50, "concurrency": (1, 4, 16), "get_seconds": 10.0, "warmup": 4}
QUICK_RUN = {"sessions": 10, "concurrency": (1, 4), "get_seconds": 3.0, "warmup": 2}
TOKEN_TTL_S = 24 * 3600
REQUEST_TIMEOUT_S = 30.0
# A hard ceiling besides the clock, so that no client loop is unbounded even
# if the clock misbehaves.
MAX_GETS_PER_THREAD = 1_000_000
# After a failed GET, so that a service that went away is not hammered in a
# tight loop for the rest of the measurement.
GET_ERROR_PAUSE_S = 0.05
# Production's settings (INFO logs, a 2 s heartbeat) rather than the test
# suite's (DEBUG logs, a 0.5 s heartbeat), so the figures describe a deployment.
STACK_ENV = {"ENCLAVE_ENV": "production", "ENCLAVE_LOG_LEVEL": "INFO"}


@dataclass
class Record:
    """What client threads measured: latencies in ms and failures by kind."""

    post_ms: list[float] = field(default_factory=list)
    done_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    @classmethod
    def merged(cls, records: Sequence[Record]) -> Record:
        total = cls()
        for record in records:
            total.post_ms.extend(record.post_ms)
            total.done_ms.extend(record.done_ms)
            total.errors.update(record.errors)
        return total


@dataclass(frozen=True)
class Measurement:
    record: Record
    wall_s: float
    client_cpu_s: float
    unfinished_threads: int

    @property
    def client_cpu_share(self) -> float:
        """Client CPU time over wall time: 1.0 is one core kept busy."""
        return self.client_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


class Claims:
    """Hands out at most `limit` tickets to any number of threads."""

    def __init__(self, limit: int):
        self._left = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile: the least value with `fraction` of all at or below."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))

    return ordered[rank - 1]


def run_session(
    stack: ServiceStack,
    client: requests.Session,
    token: str,
    stream_timeout_s: float,
    record: Record,
) -> str | None:
    """Create one session and follow its stream to the `result` event.

    Returns the session id, or None when the session failed to turn around
    (the failure is counted in `record`).
    """
    body = {"language": "python", "code": SESSION_CODE}
    started = time.perf_counter()
    try:
        response = client.post("/sessions", json=body)
        posted = time.perf_counter()
        if response.status_code != 201:
            record.errors[f"POST /sessions answered {response.status_code}"] += 1
            return None
        session_id = response.json()["id"]
        events = stack.stream(session_id, token, timeout=stream_timeout_s)
        with contextlib.closing(events):
            for event in events:
                if event.event == "result":
                    finished = time.perf_counter()
                    break
            else:
                record.errors["the stream closed without a result event"] += 1
                return None
    except (requests.RequestException, StackError, TimeoutError, ValueError) as exc:
        # Counted, not raised: a benchmark reports failures next to the figures.
        record.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
        return None

    record.post_ms.append((posted - started) * 1000)
    record.done_ms.append((finished - started) * 1000)
    return session_id


def run_threads(
    targets: Sequence[Callable[[threading.Event], None]],
    join_by: float,
) -> tuple[float, int]:
    """Run each target in a daemon thread; return wall seconds and threads left running.

    A thread still running at `join_by` (a `time.monotonic()` instant) is
    told to stop and left behind: it is a daemon, and its requests time out.
    """
    stop = threading.Event()
    threads = [
        threading.Thread(target=target, args=(stop,), daemon=True) for target in targets
    ]
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, join_by - time.monotonic()))
    finally:
        stop.set()
    wall_s = time.perf_counter() - started

    return wall_s, sum(thread.is_alive() for thread in threads)


def measure_sessions(
    stack: ServiceStack,
    concurrency: int,
    count: int,
    stream_timeout_s: float,
    level_timeout_s: float,
) -> Measurement:
    """`count` sessions shared out among `concurrency` client threads."""
    claims = Claims(count)
    records = [Record() for _ in range(concurrency)]
    # Tokens are minted before the clock starts. One org per client thread:
    # each holds at most one active session, far below the per-org quota.
    tokens = [
        stack.token(f"org_bench_{index}", ttl=TOKEN_TTL_S)
        for index in range(concurrency)
    ]
    deadline = time.monotonic() + level_timeout_s

    def client_loop(stop: threading.Event, record: Record, token: str) -> None:
        with stack.client(token, timeout=REQUEST_TIMEOUT_S) as client:
            while not stop.is_set() and time.monotonic() < deadline and claims.take():
                run_session(stack, client, token, stream_timeout_s, record)

    targets = [
        _bind(client_loop, record, token) for record, token in zip(records, tokens)
    ]
    cpu_before = _client_cpu_s()
    # A session claimed just before the deadline may still need a POST and a
    # whole stream to finish.
    join_by = deadline + REQUEST_TIMEOUT_S + stream_timeout_s
    wall_s, unfinished = run_threads(targets, join_by)

    return Measurement(
        Record.merged(records), wall_s, _client_cpu_s() - cpu_before, unfinished
    )


def measure_reads(
    stack: ServiceStack,
    session_id: str,
    token: str,
    threads: int,
    seconds: float,
) -> Measurement:
    """`GET /sessions/{id}` from `threads` threads for `seconds` seconds."""
    records = [Record() for _ in range(threads)]
    path = f"/sessions/{session_id}"
    until = time.monotonic() + seconds

    def read_loop(stop: threading.Event, record: Record) -> None:
        with stack.client(token, timeout=REQUEST_TIMEOUT_S) as client:
            for _ in range(MAX_GETS_PER_THREAD):
                if stop.is_set() or time.monotonic() >= until:
                    return
                started = time.perf_counter()
                try:
                    response = client.get(path)
                except requests.RequestException as exc:
                    record.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                    time.sleep(GET_ERROR_PAUSE_S)
                    continue
                elapsed_ms = (time.perf_counter() - started) * 1000
                if response.status_code == 200:
                    record.done_ms.append(elapsed_ms)
                else:
                    record.errors[f"GET answered {response.status_code}"] += 1

    cpu_before = _client_cpu_s()
    wall_s, unfinished = run_threads(
        [_bind(read_loop, record) for record in records],
        until + REQUEST_TIMEOUT_S,
    )

    return Measurement(
        Record.merged(records), wall_s, _client_cpu_s() - cpu_before, unfinished
    )


def finished_session(stack: ServiceStack, token: str, timeout_s: float) -> str:
    """A session that reached its result, for the read benchmark to fetch."""
    record = Record()
    with stack.client(token, timeout=REQUEST_TIMEOUT_S) as client:
        session_id = run_session(stack, client, token, timeout_s, record)
    if session_id is None:
        raise RuntimeError(
            f"could not run a session to read back: {dict(record.errors)}"
        )

    return session_id


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description=(
            "Start the service (gunicorn, RQ workers, Redis, a database; the "
            "simulator backend) and print session latency and read throughput."
        ),
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=4, help="RQ workers (default 4)"
    )
    parser.add_argument(
        "--web-workers",
        type=_positive_int,
        default=2,
        help="gunicorn workers, passed as WEB_CONCURRENCY (default 2)",
    )
    parser.add_argument(
        "--database", choices=("postgres", "sqlite"), default="postgres"
    )
    parser.add_argument(
        "--sessions",
        type=_positive_int,
        help=f"sessions per concurrency level (default {FULL_RUN['sessions']})",
    )
    parser.add_argument(
        "--concurrency",
        type=_levels,
        help="comma-separated client thread counts (default 1,4,16)",
    )
    parser.add_argument(
        "--get-seconds",
        type=_positive_float,
        help=f"length of the GET measurement (default {FULL_RUN['get_seconds']:g})",
    )
    parser.add_argument(
        "--get-threads",
        type=_positive_int,
        default=8,
        help="client threads of the GET measurement (default 8)",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        help="sessions run and discarded before measuring (default 4)",
    )
    parser.add_argument(
        "--simulator-step-s",
        type=_non_negative_float,
        default=0.0,
        help=(
            "the simulator's scripted provisioning delay per session; the "
            f"service's default is {Settings.simulator_step_s:g} (default here "
            "0: measure the control plane alone)"
        ),
    )
    parser.add_argument(
        "--session-timeout-s",
        type=_positive_float,
        default=60.0,
        help="give up on one session's stream after this long (default 60)",
    )
    parser.add_argument(
        "--level-timeout-s",
        type=_positive_float,
        default=600.0,
        help="start no new session in a level after this long (default 600)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run: 10 sessions per level at 1,4 clients, 3 s of GETs",
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
            benchmark(args, cleanup)
        finally:
            # From here on a Ctrl+C must not cut clean-up short: an impatient
            # second press would leave servers running.
            _ignore_interrupts()
            cleanup.close()
    except KeyboardInterrupt:
        logger.warning("interrupted; everything this run started is stopped")
        return 130
    except (ServerError, StackError) as exc:
        logger.error("the service could not be brought up: %s", exc)
        return 1

    return 0


def benchmark(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="enclave-bench-"))
    if args.keep_logs:
        cleanup.callback(logger.info, "service logs kept in %s", workdir / "stack")
    else:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)

    redis_server = RedisServer()
    cleanup.callback(redis_server.stop)
    redis_server.start()

    if args.database == "postgres":
        postgres_server = PostgresServer()
        cleanup.callback(postgres_server.stop)
        postgres_server.start()
        database_url = postgres_server.url
        database = f"PostgreSQL {_postgres_version(database_url)}"
        database_note = (
            "throwaway cluster on 127.0.0.1, fsync and synchronous_commit off"
        )
    else:
        database_url = f"sqlite:///{workdir / 'enclave.db'}"
        database = f"SQLite {sqlite3.sqlite_version}"
        database_note = "a file in a temporary directory, WAL journal"

    stack = ServiceStack(
        database_url=database_url,
        redis_url=redis_server.url,
        workdir=workdir / "stack",
        workers=args.workers,
        backend="simulator",
        env={
            **STACK_ENV,
            "WEB_CONCURRENCY": str(args.web_workers),
            "ENCLAVE_SIMULATOR_STEP_S": str(args.simulator_step_s),
        },
    )
    cleanup.callback(stack.stop)
    stack.start()
    stack.wait_healthy(60)

    print_header(args, database, database_note, _redis_version(redis_server.url))

    if args.warmup:
        logger.info("warming up with %s sessions", args.warmup)
        measure_sessions(
            stack,
            min(args.warmup, 4),
            args.warmup,
            args.session_timeout_s,
            args.level_timeout_s,
        )

    say()
    say("POST /sessions -> `result` event on its stream (latency in ms)")
    say(
        f"{'clients':>7} {'done':>5} {'failed':>6} {'POST p50':>9} {'p50':>7} "
        f"{'p90':>7} {'p99':>7} {'sessions/s':>10} {'client CPU':>10}"
    )
    for concurrency in args.concurrency:
        logger.info(
            "measuring sessions concurrency=%s sessions=%s", concurrency, args.sessions
        )
        level = measure_sessions(
            stack,
            concurrency,
            args.sessions,
            args.session_timeout_s,
            args.level_timeout_s,
        )
        print_session_level(concurrency, level)

    logger.info(
        "measuring reads threads=%s seconds=%s", args.get_threads, args.get_seconds
    )
    token = stack.token("org_bench_reader", ttl=TOKEN_TTL_S)
    session_id = finished_session(stack, token, args.session_timeout_s)
    reads = measure_reads(stack, session_id, token, args.get_threads, args.get_seconds)
    print_reads(args, reads)


def print_header(
    args: argparse.Namespace, database: str, database_note: str, redis_version: str
) -> None:
    affinity = len(os.sched_getaffinity(0))
    # The client shares the machine with the service, and anything else
    # running there skews every figure: say how busy it was.
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    say("Enclave control-plane benchmark")
    say(
        f"  machine       {os.cpu_count()} CPUs ({affinity} usable by this process), "
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    say(f"  load average  {load} (1, 5, 15 min) when measuring began")
    say(
        f"  web           gunicorn {_version('gunicorn')}, {args.web_workers} gevent "
        f"workers (WEB_CONCURRENCY={args.web_workers})"
    )
    say(
        f"  RQ workers    {args.workers} (rq {_version('rq')}; "
        "each job runs in a forked work horse)"
    )
    say(f"  database      {database} ({database_note})")
    say(f"  redis         {redis_version} (throwaway, no persistence)")
    say(
        f"  backend       simulator, code {SESSION_CODE!r}; scripted provisioning "
        f"delay {args.simulator_step_s * 1000:g} ms per session "
        f"(ENCLAVE_SIMULATOR_STEP_S={args.simulator_step_s:g}; the service's "
        f"default is {Settings.simulator_step_s * 1000:g} ms)"
    )
    say(
        "  settings      ENCLAVE_ENV=production defaults, log level INFO, "
        "gunicorn access log on"
    )
    say(
        "  client        threads of this process, on the same machine as the "
        f"service; {args.warmup} warm-up sessions not counted"
    )


def print_session_level(concurrency: int, level: Measurement) -> None:
    record = level.record
    done = len(record.done_ms)
    failed = sum(record.errors.values())
    rate = done / level.wall_s if level.wall_s > 0 else 0.0
    say(
        f"{concurrency:>7} {done:>5} {failed:>6} "
        f"{_ms(percentile(record.post_ms, 0.5)):>9} "
        f"{_ms(percentile(record.done_ms, 0.5)):>7} "
        f"{_ms(percentile(record.done_ms, 0.9)):>7} "
        f"{_ms(percentile(record.done_ms, 0.99)):>7} "
        f"{rate:>10.1f} {level.client_cpu_share:>10.0%}"
    )
    print_problems(level)


def print_reads(args: argparse.Namespace, reads: Measurement) -> None:
    record = reads.record
    done = len(record.done_ms)
    rate = done / reads.wall_s if reads.wall_s > 0 else 0.0
    say()
    say(
        f"GET /sessions/{{id}} of one finished session: {args.get_threads} threads, "
        "one keep-alive connection each"
    )
    say(
        f"  {done} requests in {reads.wall_s:.1f} s: {rate:.0f} req/s; latency "
        f"p50 {_ms(percentile(record.done_ms, 0.5))} ms, "
        f"p99 {_ms(percentile(record.done_ms, 0.99))} ms; "
        f"{sum(record.errors.values())} failed; "
        f"client CPU {reads.client_cpu_share:.0%} of one core"
    )
    print_problems(reads)


def print_problems(measurement: Measurement) -> None:
    for problem, count in measurement.record.errors.most_common(3):
        say(f"    {count} x {problem}")
    if measurement.unfinished_threads:
        say(
            f"    {measurement.unfinished_threads} client threads were still "
            "running at the deadline and were left behind"
        )


def say(line: str = "") -> None:
    """One line of the report on stdout, flushed so a pipe sees it at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _bind(function: Callable, *arguments) -> Callable[[threading.Event], None]:
    def target(stop: threading.Event) -> None:
        function(stop, *arguments)

    return target


def _client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _postgres_version(url: str) -> str:
    connection = psycopg2.connect(url, connect_timeout=10)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def _redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return f"Redis {client.info('server')['redis_version']}"
    finally:
        client.close()


def _interrupt(signum, frame) -> None:
    # SIGTERM takes the same way out as Ctrl+C, through every clean-up step.
    raise KeyboardInterrupt


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            "give one or more positive integers, e.g. 1,4,16"
        )

    return levels


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")

    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")

    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text}")

    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")

    return value


if __name__ == "__main__":
    sys.exit(main())
