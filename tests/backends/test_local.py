"""The `local` backend against real bubblewrap, real cgroups and real processes.

Every test runs real Python or Node code in a real sandbox on this host and
checks what the code could do, what the sink received, and that nothing of the
session (process, cgroup, state) is left once `launch` has returned.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from enclave.backends import SessionBackend, cgroups
from enclave.backends.local import SANDBOX_ENVIRONMENT, LocalBackend, sandbox_host_uid
from enclave.sessions.spec import KillReason, LaunchSpec, Limits, Phase
from tests.backends.recording import RecordingSink

LIMITS = Limits(
    timeout_s=20,
    cpu_s=20,
    memory_mb=256,
    cpus=1.0,
    pids=64,
    output_bytes=1024 * 1024,
    disk_mb=32,
)
LANGUAGES = ["python", "node"]
REQUIRED_BINARIES = ("bwrap", "/usr/bin/python3", "/usr/bin/node")
# Where .ci/run leaves the image's root filesystem (build-image.sh --rootfs).
DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
# Documentation range (TEST-NET-1): nothing answers there, and a sandbox that
# leaked a route would still send nothing to anyone's real host.
UNROUTED_ADDRESS = "192.0.2.1"


@pytest.fixture(scope="module", autouse=True)
def _binaries():
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"the local backend's tests need {', '.join(missing)} "
            "(`apt-get install bubblewrap python3 nodejs`)",
            pytrace=False,
        )


@pytest.fixture
def backend(settings) -> LocalBackend:
    return LocalBackend(settings)


@pytest.fixture(scope="module")
def sandbox_rootfs() -> str:
    rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
    if not Path(rootfs, "usr/bin/python3").exists():
        pytest.fail(
            f"no sandbox root filesystem at {rootfs}: build one with "
            "`enclave/sandbox/build-image.sh --rootfs DIR` and name it in "
            "ENCLAVE_TEST_SANDBOX_ROOTFS",
            pytrace=False,
        )
    return rootfs


@pytest.fixture(params=["host", "image"])
def any_backend(request, settings) -> LocalBackend:
    """The backend with the host's directories as root, then with the image's."""
    if request.param == "host":
        return LocalBackend(settings)
    rootfs = request.getfixturevalue("sandbox_rootfs")
    return LocalBackend(settings.replace(sandbox_rootfs=rootfs))


@pytest.fixture
def rlimit_backend(settings) -> LocalBackend:
    """The backend as it runs where no cgroup can be made: rlimits only."""
    return LocalBackend(settings, use_cgroups=False)


def make_spec(
    code: str, language: str, stdin: str | None = None, **limits
) -> LaunchSpec:
    return LaunchSpec(
        session_id=f"test-{uuid.uuid4().hex}",
        code=code,
        language=language,
        limits=Limits.from_dict({**LIMITS.to_dict(), **limits}),
        stdin=stdin,
        org_id="org-test",
    )


def run(backend: LocalBackend, spec: LaunchSpec) -> tuple[RecordingSink, float]:
    """Launch to the end; the sink and the seconds `launch` took."""
    sink = RecordingSink(output_bytes=spec.limits.output_bytes)
    started = time.monotonic()
    backend.launch(spec, sink)
    elapsed = time.monotonic() - started
    assert sink.result_value is not None, "launch returned without a result"
    assert sink.phases == [Phase.PROVISIONING, Phase.RUNNING]
    assert_nothing_left(backend, spec.session_id)
    return sink, elapsed


def host_processes(uid: int | None = None, zombies: bool = True) -> list[int]:
    """Pids of the host's processes, only those of a real uid when given.

    A zombie has ended and holds nothing but its pid until its parent (for an
    orphan, the host's init) reaps it; `zombies=False` leaves those out.
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = dict(
                line.split(":", 1)
                for line in Path(entry.path, "status").read_text().splitlines()
                if ":" in line
            )
        except OSError:
            continue
        if uid is not None and int(status["Uid"].split()[0]) != uid:
            continue
        if not zombies and status["State"].split()[0] == "Z":
            continue
        found.append(int(entry.name))
    return found


def assert_nothing_left(backend: LocalBackend, session_id: str) -> None:
    assert not (backend.state_dir / session_id).exists(), "state directory left"
    assert not list(backend.state_dir.glob(f".{session_id}.*")), "staging left"
    layout, _ = cgroups.detect()
    if layout is not None:
        leftover = layout.session_cgroup(session_id)
        assert not leftover.exists(), f"cgroup left: {leftover.directories}"
    left = host_processes(sandbox_host_uid(session_id), zombies=False)
    assert left == [], "processes left"


def killed(sink: RecordingSink, reason: KillReason) -> bool:
    result = sink.result_value
    return result.phase is Phase.KILLED and result.kill_reason is reason


def report(sink: RecordingSink) -> str:
    return (
        f"result={sink.result_value} stdout={sink.stdout_text[-500:]!r} "
        f"stderr={sink.stderr_text[-1500:]!r}"
    )


# -- running code ---------------------------------------------------------------

HELLO = {
    "python": (
        "import sys\n"
        "data = sys.stdin.read()\n"
        "print('out:' + data)\n"
        "print('err:' + data, file=sys.stderr)\n"
        "sys.exit(3)\n"
    ),
    "node": (
        "const data = require('fs').readFileSync(0, 'utf8');\n"
        "console.log('out:' + data);\n"
        "console.error('err:' + data);\n"
        "process.exitCode = 3;\n"
    ),
}


def test_local_backend_satisfies_the_protocol(backend):
    assert isinstance(backend, SessionBackend)
    assert backend.name == "local"


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_runs_hello_world(any_backend, language):
    spec = make_spec(HELLO[language], language, stdin="héllo")

    sink, _ = run(any_backend, spec)

    assert sink.stdout_text == "out:héllo\n"
    assert sink.stderr_text == "err:héllo\n"
    result = sink.result_value
    assert result.phase is Phase.FAILED
    assert result.exit_code == 3
    assert result.signal is None
    assert result.kill_reason is None
    assert result.duration_ms is not None and result.duration_ms > 0


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_reports_success(backend, language):
    code = "print('ok')" if language == "python" else "console.log('ok')"

    sink, _ = run(backend, make_spec(code, language))

    assert sink.stdout_text == "ok\n"
    assert sink.result_value.phase is Phase.SUCCEEDED
    assert sink.result_value.exit_code == 0


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_reports_the_signal_that_ended_the_code(backend, language):
    code = {
        "python": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
        "node": "process.kill(process.pid, 'SIGTERM');\n",
    }[language]

    sink, _ = run(backend, make_spec(code, language))

    result = sink.result_value
    assert result.phase is Phase.FAILED, report(sink)
    assert result.signal == 15
    assert result.kill_reason is None


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_streams_output_as_it_arrives(any_backend, language):
    code = {
        "python": (
            "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\n"
        ),
        "node": (
            "console.log('first');\nsetTimeout(() => console.log('second'), 1000);\n"
        ),
    }[language]

    sink, _ = run(any_backend, make_spec(code, language))

    chunks = [(value, at) for kind, value, at in sink.events if kind == "stdout"]
    first = next(at for value, at in chunks if "first" in value)
    second = next(at for value, at in chunks if "second" in value)
    assert "second" not in next(value for value, _ in chunks if "first" in value)
    assert second - first >= 0.8, chunks


# -- limits ---------------------------------------------------------------------

BUSY_LOOP = {"python": "while True:\n    pass\n", "node": "while (true) {}\n"}


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_kills_on_timeout(backend, language):
    spec = make_spec(BUSY_LOOP[language], language, timeout_s=2, cpu_s=30)

    sink, elapsed = run(backend, spec)

    assert killed(sink, KillReason.TIMEOUT), report(sink)
    assert 2 <= elapsed < 4
    assert sink.result_value.duration_ms >= 2000


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_kills_on_cpu_time(backend, language):
    spec = make_spec(BUSY_LOOP[language], language, timeout_s=20, cpu_s=1)

    sink, elapsed = run(backend, spec)

    assert killed(sink, KillReason.CPU), report(sink)
    # A second of CPU time takes longer than a second of wall time on a busy
    # host, but far less than the session's timeout.
    assert elapsed < 10


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_kills_on_memory(any_backend, language):
    code = {
        "python": "data = b'x' * (1 << 30)\nprint(len(data))\n",
        "node": "const data = Buffer.alloc(1 << 30, 1);\nconsole.log(data.length);\n",
    }[language]
    spec = make_spec(code, language, memory_mb=128)

    sink, _ = run(any_backend, spec)

    assert killed(sink, KillReason.MEMORY), report(sink)
    assert sink.stdout_text == ""


FORK_BOMB = """\
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def _run_watching_processes(backend, spec) -> tuple[RecordingSink, float, int]:
    """Run in a thread while counting the session's host processes; the peak too."""
    uid = sandbox_host_uid(spec.session_id)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run=run(backend, spec)))
    thread.start()
    peak = 0
    while thread.is_alive():
        peak = max(peak, len(host_processes(uid)))
        time.sleep(0.05)
    thread.join()
    sink, elapsed = outcome["run"]
    return sink, elapsed, peak


def test_local_backend_contains_a_fork_bomb(backend):
    before = len(host_processes(zombies=False))
    spec = make_spec(FORK_BOMB, "python", timeout_s=3, pids=32)

    sink, elapsed, peak = _run_watching_processes(backend, spec)

    assert killed(sink, KillReason.TIMEOUT), report(sink)
    assert elapsed < 6
    # bwrap's monitor and init count against the limit beside the workload.
    assert 0 < peak <= 32 + 2
    # The session's own processes are all gone (`run` checks its uid); other
    # work on this host may start a few processes meanwhile, but a bomb that
    # got out would have left thousands.
    assert len(host_processes(zombies=False)) <= before + 50


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_kills_on_output_flood(backend, language):
    code = {
        "python": (
            "import sys\n"
            "line = 'x' * 999 + '\\n'\n"
            "while True:\n"
            "    sys.stdout.write(line)\n"
        ),
        # process.stdout queues in memory once the pipe is full and only the
        # event loop (never reached here) drains it: write synchronously.
        "node": (
            "const fs = require('fs');\n"
            "const line = 'x'.repeat(999) + '\\n';\n"
            "while (true) { fs.writeSync(1, line); }\n"
        ),
    }[language]
    spec = make_spec(code, language, output_bytes=64 * 1024)

    sink, elapsed = run(backend, spec)

    assert killed(sink, KillReason.OUTPUT_LIMIT), report(sink)
    recorded = len(sink.stdout_text.encode()) + len(sink.stderr_text.encode())
    assert 0 < recorded <= 64 * 1024
    assert elapsed < 5


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_limits_disk_writes(any_backend, language):
    code = {
        "python": (
            "import errno, json\n"
            "written, error = 0, None\n"
            "block = b'x' * (1 << 20)\n"
            "try:\n"
            "    with open('/tmp/fill', 'wb', buffering=0) as out:\n"
            "        while written < (1 << 30):\n"
            "            written += out.write(block)\n"
            "except OSError as exc:\n"
            "    error = errno.errorcode[exc.errno]\n"
            "print(json.dumps({'written': written, 'errno': error}))\n"
        ),
        "node": (
            "const fs = require('fs');\n"
            "const block = Buffer.alloc(1 << 20, 120);\n"
            "let written = 0, error = null;\n"
            "try {\n"
            "  const fd = fs.openSync('/tmp/fill', 'w');\n"
            "  while (written < (1 << 30)) { written += fs.writeSync(fd, block); }\n"
            "} catch (e) { error = e.code; }\n"
            "console.log(JSON.stringify({written, errno: error}));\n"
        ),
    }[language]
    free_before = shutil.disk_usage("/").free
    spec = make_spec(code, language, disk_mb=16, memory_mb=256)

    sink, _ = run(any_backend, spec)

    assert sink.result_value.phase is Phase.SUCCEEDED, report(sink)
    outcome = json.loads(sink.stdout_text)
    assert outcome["errno"] == "ENOSPC"
    assert 0 < outcome["written"] <= 16 * 1024 * 1024
    assert abs(shutil.disk_usage("/").free - free_before) < 64 * 1024 * 1024


# -- isolation ------------------------------------------------------------------

PROBE_SECRETS = {
    "python": """\
import glob, json, os
found = {}
import sys
for path in ["/etc/shadow", "/etc/gshadow", "/root", "/var/run/docker.sock",
             "/run/docker.sock", "/proc/1/environ", "/etc/passwd", "/tmp",
             sys.stdin.read()]:
    try:
        if os.path.isdir(path):
            found[path] = "dir:" + ",".join(os.listdir(path))
        else:
            with open(path, "rb") as f:
                found[path] = "read:" + f.read().decode(errors="replace")
    except OSError as exc:
        found[path] = "error:" + (exc.strerror or "")
environ = ""
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        environ += open(path, "rb").read().decode(errors="replace")
    except OSError:
        pass
try:
    open("/escape", "w")
    root_writable = True
except OSError:
    root_writable = False
print(json.dumps({"found": found, "env": dict(os.environ), "all_environ": environ,
                  "uid": os.getuid(), "root_writable": root_writable}))
""",
    "node": """\
const fs = require('fs');
const found = {};
for (const path of ["/etc/shadow", "/etc/gshadow", "/root", "/var/run/docker.sock",
                    "/run/docker.sock", "/proc/1/environ", "/etc/passwd", "/tmp",
                    fs.readFileSync(0, "utf8")]) {
  try {
    found[path] = fs.statSync(path).isDirectory()
      ? "dir:" + fs.readdirSync(path).join(",")
      : "read:" + fs.readFileSync(path, "utf8");
  } catch (e) { found[path] = "error:" + e.code; }
}
let environ = "";
for (const pid of fs.readdirSync("/proc").filter((n) => /^[0-9]+$/.test(n))) {
  try { environ += fs.readFileSync(`/proc/${pid}/environ`, "utf8"); } catch (e) {}
}
let rootWritable = true;
try { fs.writeFileSync("/escape", "x"); } catch (e) { rootWritable = false; }
console.log(JSON.stringify({found, env: process.env, all_environ: environ,
                            uid: process.getuid(), root_writable: rootWritable}));
""",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_hides_host_secrets(any_backend, language, monkeypatch):
    secret = f"jwt-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ENCLAVE_JWT_SECRET", secret)
    assert Path("/var/run/docker.sock").exists() or Path("/etc/shadow").exists()

    spec = make_spec(
        PROBE_SECRETS[language], language, stdin=str(any_backend.state_dir)
    )

    sink, _ = run(any_backend, spec)

    assert sink.result_value.phase is Phase.SUCCEEDED, report(sink)
    assert secret not in sink.stdout_text + sink.stderr_text
    seen = json.loads(sink.stdout_text)
    found = seen["found"]
    for path in (
        "/etc/shadow",
        "/etc/gshadow",
        "/var/run/docker.sock",
        "/run/docker.sock",
    ):
        assert found[path].startswith("error:"), (path, found[path])
    assert found["/root"].startswith("error:") or found["/root"] == "dir:"
    # A fresh /tmp: nothing of the host's, nor the worker's state directory.
    assert found["/tmp"] == "dir:"
    assert found[str(any_backend.state_dir)].startswith("error:")
    assert "ENCLAVE" not in found["/proc/1/environ"]
    # The sandbox's /etc/passwd is its own, not the host's list of accounts.
    assert "postgres" not in found["/etc/passwd"]
    assert "sandbox:x:1000" in found["/etc/passwd"]
    assert set(seen["env"]) <= set(SANDBOX_ENVIRONMENT) | {"PWD", "LC_CTYPE"}
    assert "ENCLAVE" not in seen["all_environ"]
    assert seen["uid"] == 1000
    assert seen["root_writable"] is False


NETWORK_PROBE = {
    "python": """\
import errno, json, socket, sys
targets = json.load(sys.stdin)
outcome = {"interfaces": [name for _, name in socket.if_nameindex()]}
for name, (host, port) in targets.items():
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        outcome[name] = "connected"
    except OSError as exc:
        outcome[name] = errno.errorcode.get(exc.errno, str(exc))
print(json.dumps(outcome))
""",
    "node": """\
const net = require('net');
const os = require('os');
const targets = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const outcome = {interfaces: Object.keys(os.networkInterfaces())};
function attempt(name, [host, port]) {
  return new Promise((resolve) => {
    const s = net.connect({host, port, timeout: 3000});
    s.on('connect', () => { outcome[name] = 'connected'; s.destroy(); resolve(); });
    s.on('timeout', () => { outcome[name] = 'timeout'; s.destroy(); resolve(); });
    s.on('error', (e) => { outcome[name] = e.code; resolve(); });
  });
}
(async () => {
  for (const [name, target] of Object.entries(targets)) { await attempt(name, target); }
  console.log(JSON.stringify(outcome));
})();
""",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_local_backend_has_no_network(any_backend, language):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    targets = {"loopback": ["127.0.0.1", port], "outside": [UNROUTED_ADDRESS, 80]}
    try:
        # The listener is reachable from the host: a refusal below is the sandbox's.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

        sink, _ = run(
            any_backend,
            make_spec(NETWORK_PROBE[language], language, stdin=json.dumps(targets)),
        )
    finally:
        listener.close()

    assert sink.result_value.phase is Phase.SUCCEEDED, report(sink)
    outcome = json.loads(sink.stdout_text)
    assert outcome["interfaces"] == ["lo"]
    # Refused: the sandbox's loopback is its own, and nothing listens on it.
    assert outcome["loopback"] == "ECONNREFUSED"
    # Unreachable at once: there is no route, so not a packet leaves.
    assert outcome["outside"] == "ENETUNREACH"


# -- teardown -------------------------------------------------------------------

SLEEPER = """\
import os, subprocess, sys, time
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            for _ in range(3)]
print("ready", flush=True)
time.sleep(60)
"""

TEARDOWN_FROM_ELSEWHERE = """\
import sys
from enclave.config import Settings
from enclave.backends.local import LocalBackend
LocalBackend(Settings(state_dir=sys.argv[1])).teardown(sys.argv[2])
"""


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_local_backend_teardown_from_another_process_ends_launch(backend, settings):
    spec = make_spec(SLEEPER, "python", timeout_s=60, cpu_s=60)
    uid = sandbox_host_uid(spec.session_id)
    sink = RecordingSink()
    thread = threading.Thread(target=backend.launch, args=(spec, sink))
    thread.start()
    try:
        _wait_for(lambda: "ready" in sink.stdout_text, 10, "the code to start")
        # bwrap's monitor and init, the interpreter and its three children, all
        # as the session's own unprivileged host uid.
        assert len(host_processes(uid)) >= 6
        assert uid != 0

        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-c",
                TEARDOWN_FROM_ELSEWHERE,
                settings.state_dir,
                spec.session_id,
            ],
            check=True,
            timeout=30,
        )
        thread.join(timeout=10)
        assert not thread.is_alive(), "launch did not return after teardown"
        assert time.monotonic() - started < 10
    finally:
        backend.teardown(spec.session_id)
        thread.join(timeout=10)

    assert killed(sink, KillReason.TEARDOWN), report(sink)
    assert_nothing_left(backend, spec.session_id)
    backend.teardown(spec.session_id)
    backend.teardown(spec.session_id)
    assert_nothing_left(backend, spec.session_id)


def test_local_backend_teardown_in_process_ends_launch(backend):
    spec = make_spec(SLEEPER, "python", timeout_s=60, cpu_s=60)
    sink = RecordingSink()
    thread = threading.Thread(target=backend.launch, args=(spec, sink))
    thread.start()
    _wait_for(lambda: "ready" in sink.stdout_text, 10, "the code to start")

    backend.teardown(spec.session_id)
    thread.join(timeout=10)

    assert not thread.is_alive(), "launch did not return after teardown"
    assert killed(sink, KillReason.TEARDOWN), report(sink)
    assert_nothing_left(backend, spec.session_id)


LAUNCH_ELSEWHERE = """\
import sys
from enclave.backends.local import LocalBackend
from enclave.config import Settings
from enclave.sessions.spec import LaunchSpec, Limits
from tests.backends.recording import RecordingSink


class Relay(RecordingSink):
    def stdout(self, chunk):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        return True


state_dir, session_id, code = sys.argv[1:4]
limits = Limits(timeout_s=60, cpu_s=60, memory_mb=256, cpus=1.0, pids=64,
                output_bytes=65536, disk_mb=16)
spec = LaunchSpec(session_id=session_id, code=code, language="python", limits=limits)
LocalBackend(Settings(state_dir=state_dir)).launch(spec, Relay())
"""


def test_local_backend_worker_death_ends_the_sandbox_and_teardown_reclaims(
    backend, settings
):
    session_id = f"test-{uuid.uuid4().hex}"
    uid = sandbox_host_uid(session_id)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH_ELSEWHERE,
            settings.state_dir,
            session_id,
            SLEEPER,
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline() == "ready\n"
        assert len(host_processes(uid, zombies=False)) >= 6

        worker.kill()
        worker.wait(timeout=10)
        # bwrap dies with its parent, its init with bwrap, the rest with init.
        _wait_for(
            lambda: not host_processes(uid, zombies=False),
            5,
            "the sandbox to die with its worker",
        )
    finally:
        worker.kill()
        worker.wait(timeout=10)
        worker.stdout.close()
    assert (backend.state_dir / session_id).exists()

    backend.teardown(session_id)

    assert_nothing_left(backend, session_id)


def test_local_backend_teardown_of_ended_or_unknown_sessions_is_harmless(backend):
    spec = make_spec("print('done')", "python")
    run(backend, spec)

    backend.teardown(spec.session_id)
    backend.teardown(f"never-{uuid.uuid4().hex}")
    backend.teardown("../../etc")

    assert_nothing_left(backend, spec.session_id)
    assert Path("/etc/passwd").exists()


# -- sessions that cannot start ------------------------------------------------


def test_local_backend_reports_a_root_without_the_interpreter_as_failed(
    settings, tmp_path
):
    empty_root = tmp_path / "empty-root"
    empty_root.mkdir()
    backend = LocalBackend(settings.replace(sandbox_rootfs=str(empty_root)))
    sink = RecordingSink()
    spec = make_spec("print('never')", "python")

    backend.launch(spec, sink)

    assert sink.phases == [Phase.PROVISIONING]
    result = sink.result_value
    assert result.phase is Phase.FAILED
    assert "no python interpreter" in result.error
    assert_nothing_left(backend, spec.session_id)


def test_local_backend_refuses_a_session_id_that_is_not_a_name(backend):
    spec = make_spec("print('never')", "python")
    spec = LaunchSpec(**{**spec.__dict__, "session_id": "../escape"})
    sink = RecordingSink()

    backend.launch(spec, sink)

    assert sink.result_value.phase is Phase.FAILED
    assert not (backend.state_dir.parent / "escape").exists()


# -- health and the rlimit fallback ---------------------------------------------


def test_local_backend_health_reports_bwrap_and_cgroups(backend):
    health = backend.health()

    assert health.ok, health.detail
    assert "bubblewrap" in health.detail
    assert "cgroup v" in health.detail
    assert "unprivileged host uids" in health.detail


def test_local_backend_health_with_the_image_root(settings, sandbox_rootfs):
    backend = LocalBackend(settings.replace(sandbox_rootfs=sandbox_rootfs))

    health = backend.health()

    assert health.ok, health.detail


def test_local_backend_health_says_when_only_rlimits_apply(rlimit_backend):
    health = rlimit_backend.health()

    assert health.ok, health.detail
    assert "rlimits only" in health.detail


def test_local_backend_without_cgroups_limits_memory(rlimit_backend):
    spec = make_spec(
        "data = b'x' * (1 << 30)\nprint(len(data))\n", "python", memory_mb=128
    )

    sink, _ = run(rlimit_backend, spec)

    # Without a cgroup the allocation fails inside the program, which then
    # exits on its own: there is no kernel OOM kill to report.
    assert sink.result_value.phase is Phase.FAILED, report(sink)
    assert "MemoryError" in sink.stderr_text
    assert sink.stdout_text == ""


def test_local_backend_without_cgroups_limits_cpu_time(rlimit_backend):
    spec = make_spec(BUSY_LOOP["python"], "python", timeout_s=20, cpu_s=1)

    sink, elapsed = run(rlimit_backend, spec)

    assert killed(sink, KillReason.CPU), report(sink)
    assert sink.result_value.signal == signal.SIGXCPU
    assert elapsed < 10


def test_local_backend_without_cgroups_contains_a_fork_bomb(rlimit_backend):
    spec = make_spec(FORK_BOMB, "python", timeout_s=3, pids=32)

    sink, elapsed, peak = _run_watching_processes(rlimit_backend, spec)

    assert killed(sink, KillReason.TIMEOUT), report(sink)
    assert elapsed < 6
    assert 0 < peak <= 32 + 2


def test_local_backend_without_cgroups_teardown_kills_the_tree(rlimit_backend):
    spec = make_spec(SLEEPER, "python", timeout_s=60, cpu_s=60)
    sink = RecordingSink()
    thread = threading.Thread(target=rlimit_backend.launch, args=(spec, sink))
    thread.start()
    _wait_for(lambda: "ready" in sink.stdout_text, 10, "the code to start")

    rlimit_backend.teardown(spec.session_id)
    thread.join(timeout=10)

    assert not thread.is_alive(), "launch did not return after teardown"
    assert killed(sink, KillReason.TEARDOWN), report(sink)
    assert_nothing_left(rlimit_backend, spec.session_id)


# -- cgroup layouts ---------------------------------------------------------------


def test_local_backend_cgroup_layout_detected_on_this_host():
    layout, reason = cgroups.detect()

    assert layout is not None, reason
    assert {"memory", "pids"} <= set(layout.controllers)


def test_local_backend_cgroup_v2_layout_in_a_delegated_subtree(tmp_path):
    """A v2-only host: sessions go under the worker's cgroup with v2's file names."""
    mount = tmp_path / "cgroup"
    own = mount / "worker.slice" / "worker.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    proc_self = tmp_path / "proc-self"
    proc_self.mkdir()
    (proc_self / "mountinfo").write_text(
        f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (proc_self / "cgroup").write_text("0::/worker.slice/worker.service\n")

    layout, reason = cgroups.detect(str(proc_self))

    assert layout is not None, reason
    assert layout.version == 2
    assert layout.parents == {c: str(own) for c in ("cpu", "memory", "pids")}
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    limits = Limits.from_dict(
        {**LIMITS.to_dict(), "memory_mb": 128, "pids": 10, "cpus": 0.5}
    )
    session = layout.create("abc", limits, extra_pids=2)
    directory = own / "enclave-abc"
    assert session.directories == [str(directory)]
    assert (directory / "memory.max").read_text() == str(128 * 1024 * 1024)
    assert (directory / "pids.max").read_text() == "12"
    assert (directory / "cpu.max").read_text() == "50000 100000"
    assert session.join_files() == [str(directory / "cgroup.procs")]
