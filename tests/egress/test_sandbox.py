"""A session's path out as the worker prepares it and a sandbox uses it.

`SessionEgress` against real Redis and the real filesystem; the relay run on
this host as the sandbox runs it; the local and docker backends refusing to
run a session whose path out was never prepared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from enclave.backends.docker import DockerBackend
from enclave.backends.local import LocalBackend
from enclave.config import Settings
from enclave.egress import sandbox
from enclave.egress.authority import prepare_authority
from enclave.egress.bridge import Bridge
from enclave.egress.policy import load_policy, policy_key, token_digest
from enclave.sessions.spec import EgressPolicy, LaunchSpec, Limits, Phase
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
RELAY = Path(sandbox.SANDBOX_SOURCES) / sandbox.RELAY_FILE


@pytest.fixture
def sessions_dir():
    directory = tempfile.mkdtemp(prefix="enclave-egress-unit-")
    os.chmod(directory, 0o711)
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def settings(tmp_path, sessions_dir) -> Settings:
    return Settings.load(
        {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_STATE_DIR": str(tmp_path / "state"),
            "ENCLAVE_EGRESS_CA_DIR": str(tmp_path / "ca"),
            "ENCLAVE_EGRESS_SESSIONS_DIR": str(sessions_dir),
            "ENCLAVE_EGRESS_PROXY_ADDRESS": "127.0.0.1:9",
        }
    )


def make_spec(session_id="ses_unit", allow=("api.test",)) -> LaunchSpec:
    return LaunchSpec(
        session_id=session_id,
        code="print('hi')",
        language="python",
        limits=LIMITS,
        egress=EgressPolicy(allow=allow),
        service_bindings=("github",),
        org_id="org_unit",
    )


def test_sandbox_session_egress_prepares_directory_policy_and_environment(
    settings, redis_client
):
    prepare_authority(settings)

    with sandbox.SessionEgress.open(settings, redis_client, make_spec()) as egress:
        directory = egress.directory
        names = sorted(p.name for p in directory.iterdir())
        environment = json.loads((directory / sandbox.ENVIRONMENT_FILE).read_text())
        policy = load_policy(redis_client, "ses_unit")
        mode = stat.S_IMODE(directory.stat().st_mode)
        env_mode = stat.S_IMODE((directory / sandbox.ENVIRONMENT_FILE).stat().st_mode)
        is_socket = stat.S_ISSOCK((directory / sandbox.SOCKET_FILE).stat().st_mode)
        stored = redis_client.get(policy_key("ses_unit"))

    assert names == sorted(
        [
            sandbox.SOCKET_FILE,
            sandbox.RELAY_FILE,
            sandbox.NODE_PRELOAD_FILE,
            sandbox.CA_BUNDLE_FILE,
            sandbox.ENVIRONMENT_FILE,
        ]
    )
    assert mode == 0o700 and env_mode == 0o600 and is_socket
    proxy = environment["HTTPS_PROXY"]
    assert proxy.startswith("http://ses_unit:") and proxy.endswith("@127.0.0.1:3128")
    token = proxy.split(":")[2].split("@")[0]
    for name in ("HTTP_PROXY", "http_proxy", "https_proxy"):
        assert environment[name] == proxy
    for name in sandbox.CA_VARIABLES:
        assert environment[name] == "/run/enclave/ca-bundle.pem"
    assert environment["NODE_OPTIONS"] == "--require /run/enclave/node-proxy.js"
    assert policy.org_id == "org_unit" and policy.allow == ("api.test",)
    assert policy.bindings == ("github",)
    assert policy.token_sha256 == token_digest(token) and policy.accepts(token)
    assert token.encode() not in stored
    # Closed: the policy, the bridge and the directory are gone.
    assert load_policy(redis_client, "ses_unit") is None
    assert not directory.exists()


def test_sandbox_session_egress_unavailable_before_the_proxy_started(
    settings, redis_client
):
    with pytest.raises(sandbox.EgressUnavailable, match="not started"):
        sandbox.SessionEgress.open(settings, redis_client, make_spec())

    assert load_policy(redis_client, "ses_unit") is None
    assert not sandbox.session_directory(settings, "ses_unit").exists()


def test_sandbox_hand_over_gives_the_directory_to_the_sandbox_uid(
    settings, redis_client
):
    prepare_authority(settings)
    with sandbox.SessionEgress.open(settings, redis_client, make_spec()) as egress:
        sandbox.hand_over(egress.directory, 1000)
        owners = {p.name: p.lstat().st_uid for p in egress.directory.iterdir()}
        owner = egress.directory.stat().st_uid

    assert owner == 1000 and set(owners.values()) == {1000}


def test_sandbox_remove_session_directory_is_idempotent(settings):
    directory = sandbox.session_directory(settings, "ses_left")
    directory.mkdir(parents=True)
    (directory / "leftover").write_text("x")

    sandbox.remove_session_directory(settings, "ses_left")
    sandbox.remove_session_directory(settings, "ses_left")

    assert not directory.exists()
    with pytest.raises(ValueError):
        sandbox.session_directory(settings, "../escape")


def test_sandbox_default_sessions_directory_is_beside_the_state_directory(tmp_path):
    settings = Settings.load(
        {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_STATE_DIR": str(tmp_path / "state"),
        }
    )

    assert sandbox.sessions_directory(settings) == tmp_path / "state-egress"


@pytest.mark.parametrize("kind", ["local", "docker"])
def test_sandbox_backends_fail_closed_without_a_prepared_directory(settings, kind):
    backend = LocalBackend(settings) if kind == "local" else DockerBackend(settings)
    sink = RecordingSink()

    backend.launch(make_spec(f"ses_unprepared_{kind}"), sink)

    result = sink.result_value
    assert result.phase is Phase.FAILED
    assert "network access was not prepared" in result.error
    assert "hi" not in sink.stdout_text


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(1024)
        self.request.sendall(b"echo:" + data)


def _kill_relays(marker: str) -> None:
    """Kill the relay processes this test started (found by their socket path)."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path("/proc", name, "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sandbox_relay_forwards_sets_environment_and_lets_output_end(tmp_path):
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    socket_path = tmp_path / "relay-test.sock"
    bridge = Bridge(socket_path, echo.server_address)
    bridge.start()
    environment = tmp_path / "environment.json"
    environment.write_text(json.dumps({"HTTPS_PROXY": "http://s:t@127.0.0.1:1"}))
    port = _free_port()
    code = (
        "import os, socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n"
        "s.sendall(b'ping')\n"
        "print(s.recv(100).decode(), os.environ['HTTPS_PROXY'], flush=True)\n"
    )
    try:
        completed = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                str(RELAY),
                str(socket_path),
                str(environment),
                str(port),
                "--",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            check=False,
            # Returns only once every holder of the pipes is gone: the relay,
            # which outlives the code, must hold none of them.
            timeout=30,
        )
    finally:
        _kill_relays(str(socket_path))
        bridge.stop()
        echo.shutdown()
        echo.server_close()

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "echo:ping http://s:t@127.0.0.1:1\n"


def test_sandbox_relay_failure_still_runs_the_code_without_a_way_out(tmp_path):
    socket_path = tmp_path / "missing-relay.sock"
    port = _free_port()
    code = "import os\nprint(sorted(k for k in os.environ if 'PROXY' in k))\n"
    try:
        completed = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                str(RELAY),
                str(socket_path),
                str(tmp_path / "missing.json"),
                str(port),
                "--",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    finally:
        _kill_relays(str(socket_path))

    assert completed.returncode == 0
    assert completed.stdout == "[]\n"
    assert "egress relay did not start" in completed.stderr
