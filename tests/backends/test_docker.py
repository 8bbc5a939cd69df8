"""The docker backend against the real engine and the real sandbox image.

The image must exist: build it with `enclave/sandbox/build-image.sh` (or
point `ENCLAVE_SANDBOX_IMAGE` at another build of it). Each test checks on the
way out that no container labelled with its session is left on the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from enclave.backends.base import SessionBackend
from enclave.backends.docker import LABEL_ORG, LABEL_SESSION, DockerBackend
from enclave.config import Settings
from enclave.errors import BackendUnavailable
from enclave.sessions.spec import (
    GitSource,
    KillReason,
    LaunchSpec,
    Limits,
    Phase,
    SessionResult,
)
from tests.backends.recording import RecordingSink

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("ENCLAVE_SANDBOX_IMAGE", "enclave-sandbox:latest")
BASE_LIMITS = Limits(
    timeout_s=20,
    cpu_s=20,
    memory_mb=256,
    cpus=1.0,
    pids=64,
    output_bytes=1024 * 1024,
    disk_mb=32,
)
# A documentation-only address (TEST-NET-1): nothing answers there, and with no
# network interface the packet never leaves the sandbox anyway.
UNROUTABLE_PUBLIC_IP = "192.0.2.1"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_client():
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"the Docker engine is not reachable ({exc}); start dockerd first",
            pytrace=False,
        )
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"the sandbox image {IMAGE} is missing; build it with "
            "enclave/sandbox/build-image.sh",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture
def settings(docker_client) -> Settings:
    return Settings(backend="docker", sandbox_image=IMAGE)


@pytest.fixture
def backend(settings) -> DockerBackend:
    return DockerBackend(settings)


@pytest.fixture
def session_id(docker_client):
    """A fresh session id; the test fails if a container of it outlives the test."""
    value = f"test-{uuid.uuid4().hex[:12]}"
    yield value
    leftovers = _containers_of(docker_client, value)
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"containers of {value} were left behind"


def _containers_of(client, session_id: str) -> list:
    return client.containers.list(
        all=True,
        filters={"label": f"{LABEL_SESSION}={session_id}"},
    )


def _spec(session_id, code, language="python", stdin=None, **limits) -> LaunchSpec:
    return LaunchSpec(
        session_id=session_id,
        code=code,
        language=language,
        limits=Limits.from_dict({**BASE_LIMITS.to_dict(), **limits}),
        stdin=stdin,
        org_id="org-test",
    )


def _run(backend, session_id, code, language="python", stdin=None, **limits):
    spec = _spec(session_id, code, language, stdin, **limits)
    sink = RecordingSink(output_bytes=spec.limits.output_bytes)
    backend.launch(spec, sink)
    assert sink.finished.is_set(), "launch returned without a result"
    return sink


def _run_in_thread(backend, spec):
    sink = RecordingSink(output_bytes=spec.limits.output_bytes)
    thread = threading.Thread(target=backend.launch, args=(spec, sink), daemon=True)
    thread.start()
    return sink, thread


def _wait_until_running(sink, within_s=15.0) -> None:
    deadline = time.monotonic() + within_s
    while Phase.RUNNING not in sink.phases:
        assert not sink.finished.is_set(), f"ended early: {sink.result_value}"
        assert time.monotonic() < deadline, "the session never started"
        time.sleep(0.02)


def _stdout_events(sink) -> list[tuple[str, float]]:
    return [(value, at) for kind, value, at in sink.events if kind == "stdout"]


def _json_line(sink) -> dict:
    return json.loads(sink.stdout_text.strip().splitlines()[-1])


# -- running code ---------------------------------------------------------------

HELLO = {
    "python": (
        "import sys\n"
        "print('hello from python')\n"
        "print('to stderr', file=sys.stderr)\n"
        "print('echo:' + sys.stdin.read())\n"
    ),
    "node": (
        "const fs = require('fs');\n"
        "console.log('hello from node');\n"
        "console.error('to stderr');\n"
        "console.log('echo:' + fs.readFileSync(0, 'utf8'));\n"
    ),
}


def test_docker_backend_satisfies_the_protocol(backend):
    assert isinstance(backend, SessionBackend)
    assert backend.name == "docker"


@pytest.mark.parametrize("language", ["python", "node"])
def test_docker_backend_hello_world(backend, session_id, language):
    sink = _run(backend, session_id, HELLO[language], language, stdin="ping ✓")

    assert sink.phases == [Phase.PROVISIONING, Phase.RUNNING]
    assert sink.stdout_text == f"hello from {language}\necho:ping ✓\n"
    assert sink.stderr_text == "to stderr\n"
    result = sink.result_value
    assert result.phase is Phase.SUCCEEDED
    assert result.exit_code == 0
    assert result.signal is None
    assert result.duration_ms is not None and result.duration_ms >= 0


@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("python", "import sys\nsys.exit(3)\n"),
        ("node", "process.exit(3);\n"),
    ],
)
def test_docker_backend_exit_code(backend, session_id, language, code):
    result = _run(backend, session_id, code, language).result_value

    assert result == SessionResult.exited(3, duration_ms=result.duration_ms)
    assert result.phase is Phase.FAILED


def test_docker_backend_signal_ends_the_run(backend, session_id):
    code = "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
    result = _run(backend, session_id, code).result_value

    assert result.phase is Phase.FAILED
    assert result.signal == signal.SIGTERM
    assert result.exit_code == 128 + signal.SIGTERM


def test_docker_backend_large_stdin_and_code_arrive_intact(backend, session_id):
    stdin = "".join(f"line {n}\n" for n in range(40_000))
    padding = "#" * 200_000
    code = (
        "import hashlib, sys\n"
        f"{padding}\n"
        "data = sys.stdin.buffer.read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest())\n"
    )
    sink = _run(backend, session_id, code, stdin=stdin)

    expected = hashlib.sha256(stdin.encode()).hexdigest()
    assert sink.stdout_text == f"{len(stdin.encode())} {expected}\n"
    assert sink.result_value.phase is Phase.SUCCEEDED


def test_docker_backend_code_is_not_on_the_command_line(backend, session_id):
    # The code must travel as data; a marker in it must not show up in any
    # process's argv, where a shell could have interpreted it.
    code = (
        "import os\n"
        "marker = 'never-in-argv-' + 'x7q'\n"
        "found = []\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        argv = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    found.append(marker.encode() in argv)\n"
        "print(any(found), len(found))\n"
    )
    sink = _run(backend, session_id, code)

    leaked, processes = sink.stdout_text.split()
    assert leaked == "False"
    assert int(processes) >= 2


@pytest.mark.parametrize(
    ("language", "code"),
    [
        (
            "python",
            (
                "import sys, time\n"
                "print('first', flush=True)\n"
                "time.sleep(1)\n"
                "print('second', flush=True)\n"
            ),
        ),
        (
            "node",
            "console.log('first');\nsetTimeout(() => console.log('second'), 1000);\n",
        ),
    ],
)
def test_docker_backend_streams_output_as_it_comes(backend, session_id, language, code):
    sink = _run(backend, session_id, code, language)

    # Pieces closer together than half a second belong to one burst of output.
    bursts: list[list[tuple[str, float]]] = []
    for text, at in _stdout_events(sink):
        if bursts and at - bursts[-1][-1][1] < 0.5:
            bursts[-1].append((text, at))
        else:
            bursts.append([(text, at)])
    assert ["".join(text for text, _ in burst) for burst in bursts] == [
        "first\n",
        "second\n",
    ]
    gap = bursts[1][0][1] - bursts[0][-1][1]
    assert 0.8 <= gap <= 2.0, f"bursts {gap:.2f} s apart"
    assert sink.result_value.phase is Phase.SUCCEEDED


# -- limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "code"),
    [("python", "while True:\n    pass\n"), ("node", "for (;;) {}\n")],
)
def test_docker_backend_timeout_kills(backend, session_id, language, code):
    started = time.monotonic()
    sink = _run(backend, session_id, code, language, timeout_s=2, cpu_s=30)
    elapsed = time.monotonic() - started

    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.TIMEOUT
    assert result.signal == signal.SIGKILL
    assert 2000 <= result.duration_ms < 3000
    assert elapsed < 4.5, f"launch took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("language", "code"),
    [("python", "while True:\n    pass\n"), ("node", "for (;;) {}\n")],
)
def test_docker_backend_cpu_limit_kills(backend, session_id, language, code):
    sink = _run(backend, session_id, code, language, timeout_s=15, cpu_s=1)

    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.CPU
    assert result.signal == signal.SIGXCPU
    # One CPU second at one CPU is about one second of wall clock, far from
    # the 15 s timeout.
    assert result.duration_ms < 5000


@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("python", "block = b'x' * (1 << 30)\nprint(len(block))\n"),
        (
            "node",
            "const block = Buffer.alloc(1 << 30, 1);\nconsole.log(block.length);\n",
        ),
    ],
)
def test_docker_backend_memory_limit_kills(backend, session_id, language, code):
    sink = _run(backend, session_id, code, language, memory_mb=128)

    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.MEMORY
    assert sink.stdout_text == ""


def test_docker_backend_fork_bomb_is_contained(backend, session_id):
    code = (
        "import os, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print(children, flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    started = time.monotonic()
    sink = _run(backend, session_id, code, pids=32, timeout_s=4)
    elapsed = time.monotonic() - started

    children = int(sink.stdout_text.split()[0])
    assert 0 < children < 32
    assert sink.result_value.kill_reason is KillReason.TIMEOUT
    assert elapsed < 8.0


@pytest.mark.parametrize(
    ("language", "code"),
    [
        (
            "python",
            "import sys\nwhile True:\n    sys.stdout.write('y' * 1000 + '\\n')\n",
        ),
        (
            "node",
            (
                "const line = 'y'.repeat(1000) + '\\n';\n"
                "function flood() {\n"
                "  while (process.stdout.write(line)) {}\n"
                "  process.stdout.once('drain', flood);\n"
                "}\n"
                "flood();\n"
            ),
        ),
    ],
)
def test_docker_backend_output_flood_is_cut(backend, session_id, language, code):
    cap = 64 * 1024
    sink = _run(backend, session_id, code, language, output_bytes=cap, timeout_s=15)

    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.OUTPUT_LIMIT
    recorded = len(sink.stdout_text.encode()) + len(sink.stderr_text.encode())
    assert recorded == cap
    assert result.duration_ms < 5000


@pytest.mark.parametrize("directory", ["/tmp", "/workspace"])
def test_docker_backend_disk_limit_stops_writes(backend, session_id, directory):
    code = (
        "import errno, json, os\n"
        "written = 0\n"
        "block = b'z' * (1 << 20)\n"
        "failure = None\n"
        "fd = os.open(os.path.join(DIRECTORY, 'fill'), os.O_WRONLY | os.O_CREAT)\n"
        "try:\n"
        "    while written < (1 << 30):\n"
        "        written += os.write(fd, block)\n"
        "except OSError as exc:\n"
        "    failure = errno.errorcode[exc.errno]\n"
        "print(json.dumps({'written_mb': written / (1 << 20), 'error': failure}))\n"
    ).replace("DIRECTORY", repr(directory))
    sink = _run(backend, session_id, code, disk_mb=16)

    assert sink.result_value.phase is Phase.SUCCEEDED, sink.stderr_text
    report = _json_line(sink)
    assert report["error"] == "ENOSPC"
    assert 12 <= report["written_mb"] <= 16


# -- isolation ------------------------------------------------------------------

ISOLATION_PROBE = """\
import json, os

def probe(path):
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, 'rb') as handle:
                return 'read', handle.read().decode(errors='replace')
        return 'listed', ''
    except FileNotFoundError:
        return 'absent', ''
    except PermissionError:
        return 'denied', ''

def can_write(path):
    try:
        with open(path, 'w') as handle:
            handle.write('x')
        return True
    except OSError:
        return False

status = dict(
    line.split(':', 1) for line in open('/proc/self/status').read().splitlines()
)
report = {name: probe(name) for name in [
    '/etc/shadow', '/proc/1/environ', '/root', '/var/run/docker.sock',
    '/run/docker.sock',
]}
report['environ'] = dict(os.environ)
report['uid'] = os.getuid()
report['cap_eff'] = status['CapEff'].strip()
report['cap_bnd'] = status['CapBnd'].strip()
report['no_new_privs'] = status['NoNewPrivs'].strip()
report['root_writable'] = can_write('/etc/enclave-probe')
report['usr_writable'] = can_write('/usr/local/bin/probe')
report['interfaces'] = sorted(os.listdir('/sys/class/net'))
print(json.dumps(report))
"""


def test_docker_backend_hides_the_host(backend, session_id, monkeypatch):
    secret = f"worker-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ENCLAVE_TEST_WORKER_SECRET", secret)
    sink = _run(backend, session_id, ISOLATION_PROBE)

    assert sink.result_value.phase is Phase.SUCCEEDED, sink.stderr_text
    report = _json_line(sink)
    assert report["/etc/shadow"][0] == "denied"
    assert report["/root"][0] == "denied"
    assert report["/var/run/docker.sock"][0] == "absent"
    assert report["/run/docker.sock"][0] == "absent"
    # The init process shares the workload's user, so its environment may be
    # readable; it must hold nothing of the worker's.
    init_state, init_environ = report["/proc/1/environ"]
    assert init_state in ("denied", "read")
    assert secret not in init_environ
    assert secret not in json.dumps(report["environ"])
    assert not set(report["environ"]) & {"ENCLAVE_TEST_WORKER_SECRET", "DOCKER_HOST"}
    assert report["uid"] == 1000
    assert report["cap_eff"] == "0000000000000000"
    assert report["cap_bnd"] == "0000000000000000"
    assert report["no_new_privs"] == "1"
    assert report["root_writable"] is False
    assert report["usr_writable"] is False
    assert report["interfaces"] == ["lo"]


@pytest.fixture
def host_listener():
    """A TCP listener on the host's loopback that counts who connects."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(peer)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    server.close()


@pytest.mark.parametrize("language", ["python", "node"])
def test_docker_backend_has_no_network(backend, session_id, host_listener, language):
    port, accepted = host_listener
    code = {
        "python": (
            "import json, socket, sys\n"
            "outcomes = {}\n"
            "targets = [('127.0.0.1', int(sys.stdin.read())), (PUBLIC_IP, 80)]\n"
            "for host, port in targets:\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=3).close()\n"
            "        outcomes[host] = 'connected'\n"
            "    except OSError as exc:\n"
            "        outcomes[host] = type(exc).__name__\n"
            "print(json.dumps(outcomes))\n"
        ).replace("PUBLIC_IP", repr(UNROUTABLE_PUBLIC_IP)),
        "node": (
            "const net = require('net');\n"
            "const port = Number(require('fs').readFileSync(0, 'utf8'));\n"
            "const targets = [['127.0.0.1', port], [PUBLIC_IP, 80]];\n"
            "const outcomes = {};\n"
            "let pending = targets.length;\n"
            "for (const [host, p] of targets) {\n"
            "  const s = net.connect({host, port: p, timeout: 3000});\n"
            "  const done = (what) => { if (host in outcomes) return;\n"
            "    outcomes[host] = what; s.destroy();\n"
            "    if (--pending === 0) console.log(JSON.stringify(outcomes)); };\n"
            "  s.on('connect', () => done('connected'));\n"
            "  s.on('error', (e) => done(e.code));\n"
            "  s.on('timeout', () => done('timeout'));\n"
            "}\n"
        ).replace("PUBLIC_IP", json.dumps(UNROUTABLE_PUBLIC_IP)),
    }[language]
    sink = _run(backend, session_id, code, language, stdin=str(port))

    outcomes = _json_line(sink)
    assert set(outcomes) == {"127.0.0.1", UNROUTABLE_PUBLIC_IP}
    assert "connected" not in outcomes.values()
    assert accepted == []


# -- the container itself -------------------------------------------------------


def test_docker_backend_container_is_locked_down(backend, docker_client, session_id):
    spec = _spec(
        session_id,
        "import time\ntime.sleep(30)\n",
        memory_mb=200,
        cpus=0.5,
        pids=40,
        cpu_s=7.5,
        disk_mb=24,
    )
    sink, thread = _run_in_thread(backend, spec)
    _wait_until_running(sink)

    (container,) = _containers_of(docker_client, session_id)
    config = container.attrs["Config"]
    host = container.attrs["HostConfig"]
    backend.teardown(session_id)
    thread.join(10)

    assert config["Labels"][LABEL_SESSION] == session_id
    assert config["Labels"][LABEL_ORG] == "org-test"
    assert config["Labels"]["enclave.managed"] == "true"
    assert config["User"] == "1000:1000"
    assert config["Image"] == IMAGE
    assert "Env" not in config or all(
        not item.startswith("ENCLAVE_") for item in config["Env"]
    )
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd")
    assert host["Privileged"] is False
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["PidsLimit"] == 40
    assert host["Memory"] == host["MemorySwap"] == 200 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert {"Name": "cpu", "Soft": 8, "Hard": 9} in host["Ulimits"]
    assert host["Tmpfs"]["/tmp"].endswith("size=24m,mode=1777")
    assert "size=24m" in host["Tmpfs"]["/workspace"]
    assert not host.get("Binds") and not container.attrs.get("Mounts")
    assert host["LogConfig"]["Type"] == "none"


def test_docker_backend_missing_image_fails_clearly(settings, session_id):
    backend = DockerBackend(settings.replace(sandbox_image="enclave-missing:none"))
    sink = _run(backend, session_id, "print('never')\n")

    result = sink.result_value
    assert result.phase is Phase.FAILED
    assert "enclave-missing:none" in result.error
    assert "build-image.sh" in result.error
    assert Phase.RUNNING not in sink.phases


def test_docker_backend_git_source_fails_clearly(backend, session_id):
    spec = _spec(session_id, "print(1)\n")
    spec = LaunchSpec(
        session_id=spec.session_id,
        code=spec.code,
        language=spec.language,
        limits=spec.limits,
        source=GitSource(url="https://git.invalid/repo.git"),
    )
    sink = RecordingSink()
    backend.launch(spec, sink)

    assert sink.result_value.phase is Phase.FAILED
    assert "git source" in sink.result_value.error


# -- teardown -------------------------------------------------------------------


def test_docker_backend_teardown_during_run(backend, docker_client, session_id):
    spec = _spec(session_id, "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    sink, thread = _run_in_thread(backend, spec)
    _wait_until_running(sink)

    started = time.monotonic()
    backend.teardown(session_id)
    thread.join(10)

    assert not thread.is_alive(), "launch did not return after teardown"
    assert time.monotonic() - started < 5.0
    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.TEARDOWN
    assert _containers_of(docker_client, session_id) == []
    backend.teardown(session_id)
    backend.teardown(session_id)


def test_docker_backend_teardown_from_another_process(
    backend, docker_client, session_id
):
    spec = _spec(session_id, "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    sink, thread = _run_in_thread(backend, spec)
    _wait_until_running(sink)
    while "up" not in sink.stdout_text:
        time.sleep(0.02)

    # A separate interpreter, knowing nothing of the launch, tears it down.
    teardown = (
        "import sys\n"
        "from enclave.backends.docker import DockerBackend\n"
        "from enclave.config import Settings\n"
        "backend = DockerBackend(Settings(sandbox_image=sys.argv[2]))\n"
        "backend.teardown(sys.argv[1])\n"
        "backend.teardown(sys.argv[1])\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", teardown, session_id, IMAGE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    thread.join(10)

    assert not thread.is_alive(), "launch did not return after teardown"
    result = sink.result_value
    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.TEARDOWN
    assert _containers_of(docker_client, session_id) == []


def test_docker_backend_teardown_while_provisioning(backend, docker_client, session_id):
    spec = _spec(session_id, "import time\ntime.sleep(60)\n")
    sink, thread = _run_in_thread(backend, spec)
    while Phase.PROVISIONING not in sink.phases:
        time.sleep(0.001)

    backend.teardown(session_id)
    thread.join(10)

    assert not thread.is_alive(), "launch did not return after teardown"
    assert sink.result_value.kill_reason is KillReason.TEARDOWN
    assert _containers_of(docker_client, session_id) == []


def test_docker_backend_teardown_of_unknown_session_is_quiet(backend, session_id):
    backend.teardown(session_id)
    backend.teardown(session_id)


# -- health and engine errors ----------------------------------------------------


def test_docker_backend_health_ok(backend):
    health = backend.health()

    assert health.ok, health.detail
    assert IMAGE in health.detail


def test_docker_backend_health_reports_missing_image(settings):
    backend = DockerBackend(settings.replace(sandbox_image="enclave-missing:none"))
    health = backend.health()

    assert not health.ok
    assert "enclave-missing:none" in health.detail


@pytest.fixture
def unreachable_settings(settings, tmp_path) -> Settings:
    return settings.replace(docker_url=f"unix://{tmp_path}/no-engine.sock")


def test_docker_backend_health_reports_unreachable_engine(unreachable_settings):
    health = DockerBackend(unreachable_settings).health()

    assert not health.ok
    assert "cannot be reached" in health.detail


def test_docker_backend_teardown_unreachable_engine_raises(unreachable_settings):
    backend = DockerBackend(unreachable_settings)

    with pytest.raises(BackendUnavailable) as caught:
        backend.teardown("test-nowhere")

    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, docker.errors.DockerException)


def test_docker_backend_launch_unreachable_engine_fails(unreachable_settings):
    sink = RecordingSink()
    DockerBackend(unreachable_settings).launch(
        _spec("test-nowhere", "print(1)\n"), sink
    )

    result = sink.result_value
    assert result.phase is Phase.FAILED
    assert "cannot be reached" in result.error
