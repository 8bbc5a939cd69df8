"""What the egress path costs: requests direct from the host and from a sandbox.

Run from the repository root, as root (the upstream listens on ports 443
and 80 of a loopback address), with the sandbox root filesystem built for the
local backend (`enclave/sandbox/build-image.sh --rootfs DIR`)::

    .venv/bin/python -m bench.egress              # 10,000 requests through the proxy
    .venv/bin/python -m bench.egress --quick      # 1,000, to try it out
    .venv/bin/python -m bench.egress --backend docker

It starts a throwaway Redis and PostgreSQL, an HTTPS upstream on a loopback
address of its own with a throwaway CA (`tests.egress.upstreams`), and the
service with its egress proxy (`tests.stack.ServiceStack`, settings of the
test environment, which alone may map test names to the upstream, but
logging at INFO). Then:

1. Direct: from this process, straight to the upstream, `GET /hello` over
   HTTPS, each on a new connection (TCP and TLS every time), and then all on
   one keep-alive connection.
2. Through the proxy: one session, allowed `api.test` (which has a service
   binding for the session's organisation, so it is intercepted) and
   `other.test` (the same upstream under another name, passed through),
   runs the same client inside the sandbox, through the relay, the bridge and
   the proxy: new connections passed through, new connections intercepted,
   then keep-alive over one tunnel of each kind. The four runs share out the
   requested number of requests.

It prints medians and 90th percentiles per kind with the ratio of each
median to the direct one of the same connection style, and the egress
proxy's resident memory before the session and after all its requests. It
asserts nothing; a session that fails is reported with its error output.

Lifecycle: servers, upstream and stack are handed to clean-up as they are
made, so an error, Ctrl+C or SIGTERM stops everything this run started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.egress.upstreams import TestAuthority, Upstreams
from tests.servers import PostgresServer, RedisServer
from tests.stack import ServiceStack

logger = logging.getLogger(__name__)

DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
NAMES = ["api.test", "other.test"]
ORG = "org_bench"
BINDING = "bench"
BINDING_ENV = "ENCLAVE_BENCH_BINDING_VALUE"
# How the requested total is shared out: new connections cost far more than
# requests on a kept-alive one, so they get fewer.
SHARES = {
    "new_passthrough": 0.1,
    "new_intercepted": 0.1,
    "keepalive_passthrough": 0.4,
    "keepalive_intercepted": 0.4,
}
SESSION_TIMEOUT_S = 1800

# The client, run both here (direct) and in the sandbox (through the proxy):
# HTTP/1.1 on raw sockets, so that both sides measure the same work.
CLIENT = r'''
import base64, json, os, socket, ssl, statistics, time, urllib.parse

def _context(cafile):
    return ssl.create_default_context(cafile=cafile)

def connect(host, context, address=None):
    """A TLS connection to host:443: direct to `address`, or through the proxy."""
    if address is not None:
        raw = socket.create_connection((address, 443), timeout=30)
    else:
        proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
        auth = base64.b64encode(
            f"{proxy.username}:{proxy.password}".encode()).decode()
        raw = socket.create_connection((proxy.hostname, proxy.port), timeout=30)
        raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n"
                    f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise OSError("the proxy closed the tunnel")
            head += chunk
        if head.split(b" ", 2)[1] != b"200":
            raise OSError(head.split(b"\r\n", 1)[0].decode())
    tls = context.wrap_socket(raw, server_hostname=host)
    return tls, tls.makefile("rb")

def get(host, tls, reader):
    tls.sendall(f"GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status = reader.readline()
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = reader.read(length)
    if not status.startswith(b"HTTP/1.1 200") or not body.startswith(b"hello"):
        raise OSError(f"unexpected answer {status!r}")

def measure(style, host, count, context, address=None):
    samples = []
    if style == "new":
        for _ in range(count):
            started = time.perf_counter()
            tls, reader = connect(host, context, address)
            get(host, tls, reader)
            samples.append(time.perf_counter() - started)
            reader.close()
            tls.close()
    else:
        tls, reader = connect(host, context, address)
        for _ in range(count):
            started = time.perf_counter()
            get(host, tls, reader)
            samples.append(time.perf_counter() - started)
        reader.close()
        tls.close()
    samples.sort()
    return {
        "count": len(samples),
        "median_ms": statistics.median(samples) * 1000,
        "p90_ms": samples[int(len(samples) * 0.9) - 1] * 1000,
    }
'''

SANDBOX_RUN = r"""
context = _context(None)
results = {}
for kind, count in COUNTS.items():
    style, _, how = kind.partition("_")
    host = "api.test" if how == "intercepted" else "other.test"
    measure(style, host, min(5, count), context)
    results[kind] = measure(style, host, count, context)
print(json.dumps(results))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.egress", description=__doc__)
    parser.add_argument("--backend", choices=("local", "docker"), default="local")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 requests")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    total = 1_000 if args.quick else args.requests
    logging.basicConfig(level=logging.WARNING)

    if os.geteuid() != 0:
        sys.stderr.write(
            "bench.egress: run as root (the upstream uses ports 443 and 80)\n"
        )
        return 2
    rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
    if args.backend == "local" and not Path(rootfs, "usr/bin/python3").exists():
        sys.stderr.write(f"bench.egress: no sandbox root filesystem at {rootfs}\n")
        return 2

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="enclave-bench-egress-"))
        os.chmod(workdir, 0o711)
        if not args.keep_logs:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            sys.stdout.write(f"logs kept in {workdir}\n")
        return _run(cleanup, workdir, args.backend, rootfs, total)


def _run(cleanup, workdir: Path, backend: str, rootfs: str, total: int) -> int:
    authority = TestAuthority(workdir / "ca", NAMES)
    upstreams = Upstreams(authority)
    cleanup.callback(upstreams.stop)
    redis_server = RedisServer()
    cleanup.callback(redis_server.stop)
    redis_server.start()
    postgres = PostgresServer()
    cleanup.callback(postgres.stop)
    postgres.start()

    sessions_dir = workdir / "egress"
    sessions_dir.mkdir(mode=0o711)
    env = {
        "ENCLAVE_LOG_LEVEL": "INFO",
        "ENCLAVE_EGRESS_SESSIONS_DIR": str(sessions_dir),
        "ENCLAVE_EGRESS_EXTRA_CA_FILE": str(authority.ca_file),
        "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": json.dumps(
            {name: upstreams.address for name in NAMES}
        ),
        "ENCLAVE_EGRESS_BINDINGS": json.dumps(
            {
                ORG: {
                    BINDING: {
                        "host": "api.test",
                        "header": "Authorization",
                        "template": "Bearer {value}",
                        "value_env": BINDING_ENV,
                    }
                }
            }
        ),
        BINDING_ENV: "bench-credential",
    }
    if backend == "local":
        env["ENCLAVE_SANDBOX_ROOTFS"] = rootfs
    stack = ServiceStack(
        database_url=postgres.url_for(postgres.create_database()),
        redis_url=redis_server.url,
        workdir=workdir / "stack",
        backend=backend,
        workers=1,
        egress=True,
        env=env,
    )
    cleanup.callback(stack.stop)
    stack.start()
    stack.wait_healthy(90)

    counts = {kind: max(1, int(total * share)) for kind, share in SHARES.items()}
    direct = _measure_direct(authority, upstreams, counts)
    rss_before = _memory(stack.egress.popen.pid)
    sampler = _Sampler(stack.egress.popen.pid)
    sampler.start()
    started = time.monotonic()
    try:
        result = _run_session(stack, counts)
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    rss_after = _memory(stack.egress.popen.pid)

    _report(backend, counts, direct, result, rss_before, rss_after, elapsed)
    sys.stdout.write(
        "egress proxy RSS during the session, at each tenth of it (MiB): "
        + " ".join(f"{kib / 1024:.1f}" for kib in sampler.tenths())
        + "\n"
    )
    return 0 if result.get("phase") == "succeeded" else 1


def _measure_direct(authority, upstreams, counts) -> dict:
    namespace: dict = {}
    # Our own client code, the very text the sandbox runs.
    exec(compile(CLIENT, "bench-client", "exec"), namespace)  # noqa: S102
    context = namespace["_context"](str(authority.ca_file))
    measure = namespace["measure"]
    results = {}
    for style in ("new", "keepalive"):
        count = max(counts[f"{style}_passthrough"], counts[f"{style}_intercepted"])
        measure(style, "other.test", 5, context, upstreams.address)
        results[style] = measure(style, "other.test", count, context, upstreams.address)
    return results


def _run_session(stack: ServiceStack, counts: dict) -> dict:
    token = stack.token(ORG, ttl=SESSION_TIMEOUT_S * 2)
    client = stack.client(token, timeout=60)
    code = CLIENT + f"\nCOUNTS = {json.dumps(counts)}\n" + SANDBOX_RUN
    response = client.post(
        "/sessions",
        json={
            "language": "python",
            "code": code,
            "egress": {"allow": NAMES},
            "service_bindings": [BINDING],
            "limits": {"timeout_s": SESSION_TIMEOUT_S, "output_bytes": 1024 * 1024},
        },
    )
    response.raise_for_status()
    session_id = response.json()["id"]
    for event in stack.stream(session_id, token, timeout=SESSION_TIMEOUT_S + 60):
        if event.event == "result":
            break
    return client.get(f"/sessions/{session_id}/result").json()


class _Sampler(threading.Thread):
    """Reads the proxy's RSS every half second while the session runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.5):
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(_memory(self.pid)["VmRSS"])

    def stop(self) -> None:
        self._done.set()
        self.join(5)

    def tenths(self) -> list[int]:
        if not self.samples:
            return []
        step = len(self.samples) / 10
        return [
            self.samples[min(len(self.samples) - 1, int(step * i))]
            for i in range(1, 11)
        ]


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def _report(backend, counts, direct, result, rss_before, rss_after, elapsed) -> None:
    out = sys.stdout
    out.write(
        f"egress benchmark: backend={backend} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.2f} python={platform.python_version()}\n"
    )
    if result.get("phase") != "succeeded":
        out.write(
            f"the session did not succeed: {result.get('phase')} "
            f"{result.get('error')}\n{result.get('stderr', '')[-3000:]}\n"
        )
        return
    inside = json.loads(result["stdout"].strip().splitlines()[-1])
    rows = [("direct, new connection", direct["new"], direct["new"])]
    rows += [
        (
            "proxy, new connection, passed through",
            inside["new_passthrough"],
            direct["new"],
        ),
        (
            "proxy, new connection, intercepted",
            inside["new_intercepted"],
            direct["new"],
        ),
        ("direct, keep-alive", direct["keepalive"], direct["keepalive"]),
        (
            "proxy, keep-alive, passed through",
            inside["keepalive_passthrough"],
            direct["keepalive"],
        ),
        (
            "proxy, keep-alive, intercepted",
            inside["keepalive_intercepted"],
            direct["keepalive"],
        ),
    ]
    out.write(
        f"{'request':<42}{'count':>7}{'median ms':>11}{'p90 ms':>9}{'x direct':>10}\n"
    )
    for name, row, base in rows:
        out.write(
            f"{name:<42}{row['count']:>7}{row['median_ms']:>11.2f}"
            f"{row['p90_ms']:>9.2f}{row['median_ms'] / base['median_ms']:>10.1f}\n"
        )
    through = sum(counts.values()) + 20
    attempts = sum(entry["attempts"] for entry in result["egress"])
    out.write(
        f"requests through the proxy: {through} in {elapsed:.1f} s "
        f"({attempts} egress events, one per tunnel)\n"
        f"egress proxy memory: RSS {rss_before['VmRSS'] / 1024:.1f} MiB before, "
        f"{rss_after['VmRSS'] / 1024:.1f} MiB after, peak "
        f"{rss_after['VmHWM'] / 1024:.1f} MiB\n"
    )


if __name__ == "__main__":
    sys.exit(main())
