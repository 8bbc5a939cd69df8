"""Real sandboxes through the HTTP API: the local and docker backends, Python and Node.

Every scenario runs on both backends in both languages, through the real
processes (gunicorn, RQ workers, reaper) and real PostgreSQL and Redis: what a
client sees is what these tests check. The code under test is hostile on
purpose: it loops, allocates, forks, floods, fills disks and goes looking for
secrets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from urllib.parse import urlparse

import docker
import pytest
import redis

from tests.servers import redis_url_with_db
from tests.stack import ServiceStack

DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
TERMINAL = {"succeeded", "failed", "killed"}
LANGUAGES = ["python", "node"]


@pytest.fixture(scope="module", params=["local", "docker"])
def stack(request, postgres_server, redis_url, tmp_path_factory):
    backend = request.param
    env = {}
    if backend == "local":
        rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
        if os.path.isdir(rootfs):
            env["ENCLAVE_SANDBOX_ROOTFS"] = rootfs
    url = redis_url_with_db(redis_url, 14)
    redis.Redis.from_url(url).flushdb()
    service = ServiceStack(
        database_url=postgres_server.url_for(postgres_server.create_database()),
        redis_url=url,
        workdir=tmp_path_factory.mktemp(f"sandbox-{backend}"),
        backend=backend,
        workers=2,
        env=env,
    )
    with service:
        health = service.wait_healthy(90)
        assert health["backend"]["name"] == backend and health["backend"]["ok"], health
        yield service


def start(stack, language, code, **body):
    client = stack.client(stack.token("org_sbx"))
    response = client.post(
        "/sessions", json={"language": language, "code": code, **body}
    )
    assert response.status_code == 201, response.text
    return client, response.json()["id"]


def finish(stack, language, code, timeout=60, **body):
    client, session_id = start(stack, language, code, **body)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = client.get(f"/sessions/{session_id}").json()
        if session["phase"] in TERMINAL:
            return client.get(f"/sessions/{session_id}/result").json()
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} did not finish in {timeout}s")


HELLO = {
    "python": (
        "import sys\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "print('stdin said: ' + sys.stdin.read())\n"
        "sys.exit(3)\n"
    ),
    "node": (
        "process.stdout.write('to stdout\\n');\n"
        "process.stderr.write('to stderr\\n');\n"
        "let input = '';\n"
        "process.stdin.on('data', (chunk) => { input += chunk; });\n"
        "process.stdin.on('end', () => {\n"
        "  process.stdout.write('stdin said: ' + input + '\\n');\n"
        "  process.exitCode = 3;\n"
        "});\n"
    ),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_hello_world_keeps_streams_apart_and_echoes_stdin(stack, language):
    result = finish(stack, language, HELLO[language], stdin="ping")

    assert result["phase"] == "failed"
    assert result["exit_code"] == 3
    assert result["stdout"] == "to stdout\nstdin said: ping\n"
    assert result["stderr"] == "to stderr\n"
    assert result["kill_reason"] is None


STREAMING = {
    "python": "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second', flush=True)\n",
    "node": "console.log('first');\nsetTimeout(() => console.log('second'), 1000);\n",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_output_reaches_sse_clients_while_the_code_runs(stack, language):
    _, session_id = start(stack, language, STREAMING[language])
    arrivals = {}

    for event in stack.stream(session_id, stack.token("org_sbx"), timeout=60):
        if event.event == "stdout":
            for line in event.data["data"].splitlines():
                arrivals[line] = time.monotonic()

    assert arrivals["second"] - arrivals["first"] >= 0.7


BUSY = {"python": "while True:\n    pass\n", "node": "while (true) {}\n"}


@pytest.mark.parametrize("language", LANGUAGES)
def test_busy_loop_is_killed_at_the_timeout(stack, language):
    # cpu_s defaults to the timeout, and a busy loop spends CPU as fast as the
    # clock runs: with both at 2 s either limit may fire first. A roomier CPU
    # limit makes the wall clock the one under test.
    result = finish(
        stack, language, BUSY[language], limits={"timeout_s": 2, "cpu_s": 30}
    )

    assert result["phase"] == "killed"
    assert result["kill_reason"] == "timeout"
    assert result["duration_ms"] < 3000


@pytest.mark.parametrize("language", LANGUAGES)
def test_busy_loop_is_killed_for_cpu_time(stack, language):
    result = finish(
        stack, language, BUSY[language], limits={"timeout_s": 20, "cpu_s": 1}
    )

    assert result["phase"] == "killed"
    assert result["kill_reason"] == "cpu"
    assert result["duration_ms"] < 10000


ALLOCATE = {
    "python": "blob = b'x' * (1024 * 1024 * 1024)\nprint(len(blob))\n",
    "node": (
        "const held = [];\n"
        "for (let i = 0; i < 1024; i++) held.push(Buffer.alloc(1024 * 1024, 1));\n"
        "console.log(held.length);\n"
    ),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_allocating_past_the_memory_limit_is_killed_for_memory(stack, language):
    result = finish(
        stack, language, ALLOCATE[language], limits={"memory_mb": 128, "timeout_s": 30}
    )

    assert result["phase"] == "killed"
    assert result["kill_reason"] == "memory"


FORK_BOMB = {
    "python": (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    ),
    "node": (
        "const { spawn } = require('child_process');\n"
        "spawn('/bin/sh', ['-c', 'f() { f | f & }; f'], { stdio: 'ignore' });\n"
        "setTimeout(() => {}, 60000);\n"
    ),
}


def host_process_count() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def live_processes_of(uid: int) -> int:
    listing = subprocess.run(
        ["ps", "-o", "stat=", "-u", str(uid)], capture_output=True, text=True
    )
    return sum(1 for state in listing.stdout.split() if not state.startswith("Z"))


def sandbox_uid(backend: str, session_id: str) -> int:
    if backend == "docker":
        return 1000  # the image's unprivileged user
    from enclave.backends.local import sandbox_host_uid

    return sandbox_host_uid(session_id)


@pytest.mark.parametrize("language", LANGUAGES)
def test_fork_bomb_is_contained_and_leaves_nothing_behind(stack, language):
    before = host_process_count()

    client, session_id = start(
        stack, language, FORK_BOMB[language], limits={"pids": 32, "timeout_s": 4}
    )
    peak = 0
    while client.get(f"/sessions/{session_id}").json()["phase"] not in TERMINAL:
        peak = max(peak, live_processes_of(sandbox_uid(stack.backend, session_id)))
        time.sleep(0.1)
    result = client.get(f"/sessions/{session_id}/result").json()

    assert result["phase"] == "killed"
    # Thirty-odd processes spinning on fork() spend CPU time faster than the
    # clock runs, so the CPU limit (the timeout, by default) may end it first.
    assert result["kill_reason"] in ("timeout", "cpu")
    assert 0 < peak <= 32 + 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        live_processes_of(sandbox_uid(stack.backend, session_id))
        or host_process_count() > before + 10
    ):
        time.sleep(0.2)
    assert live_processes_of(sandbox_uid(stack.backend, session_id)) == 0
    assert host_process_count() <= before + 10


FLOOD = {
    "python": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "node": "const fs = require('fs');\nconst chunk = 'x'.repeat(65536);\nwhile (true) fs.writeSync(1, chunk);\n",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_output_flood_is_cut_at_the_cap_and_killed(stack, language):
    result = finish(
        stack,
        language,
        FLOOD[language],
        limits={"output_bytes": 100000, "timeout_s": 20},
    )

    assert result["phase"] == "killed"
    assert result["kill_reason"] == "output_limit"
    assert result["output_truncated"] is True
    assert len((result["stdout"] + result["stderr"]).encode()) <= 100000


FILL_TMP = {
    "python": (
        "import errno\n"
        "written = 0\n"
        "try:\n"
        "    with open('/tmp/fill', 'wb') as f:\n"
        "        while True:\n"
        "            f.write(b'0' * 1048576)\n"
        "            f.flush()\n"
        "            written += 1\n"
        "except OSError as e:\n"
        "    print('full', errno.errorcode[e.errno], written)\n"
    ),
    "node": (
        "const fs = require('fs');\n"
        "const fd = fs.openSync('/tmp/fill', 'w');\n"
        "const chunk = Buffer.alloc(1048576, 48);\n"
        "let written = 0;\n"
        "try { for (;;) { fs.writeSync(fd, chunk); written++; } }\n"
        "catch (e) { console.log('full', e.code, written); }\n"
    ),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_filling_tmp_stops_at_the_disk_limit(stack, language):
    free_before = shutil.disk_usage("/").free

    result = finish(
        stack, language, FILL_TMP[language], limits={"disk_mb": 16, "memory_mb": 256}
    )

    words = result["stdout"].split()
    assert words[:2] == ["full", "ENOSPC"], result
    assert int(words[2]) <= 16
    assert (
        abs(shutil.disk_usage("/").free - free_before)
        < 16 * 1024 * 1024 + 8 * 1024 * 1024
    )


PROBE = {
    "python": (
        "import json, os\n"
        "def attempt(path, how):\n"
        "    try:\n"
        "        return 'read:' + (os.listdir(path).__repr__() if how == 'list' else open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError as e:\n"
        "        return 'denied:' + type(e).__name__\n"
        "found = {\n"
        "    'shadow': attempt('/etc/shadow', 'read'),\n"
        "    'init_environ': attempt('/proc/1/environ', 'read'),\n"
        "    'environ': json.dumps(dict(os.environ)),\n"
        "    'docker_sock': attempt('/var/run/docker.sock', 'read'),\n"
        "    'root_home': attempt('/root', 'list'),\n"
        "}\n"
        "print(json.dumps(found))\n"
    ),
    "node": (
        "const fs = require('fs');\n"
        "function attempt(path, how) {\n"
        "  try { return 'read:' + (how === 'list' ? JSON.stringify(fs.readdirSync(path)) : fs.readFileSync(path, 'latin1')); }\n"
        "  catch (e) { return 'denied:' + e.code; }\n"
        "}\n"
        "console.log(JSON.stringify({\n"
        "  shadow: attempt('/etc/shadow'),\n"
        "  init_environ: attempt('/proc/1/environ'),\n"
        "  environ: JSON.stringify(process.env),\n"
        "  docker_sock: attempt('/var/run/docker.sock'),\n"
        "  root_home: attempt('/root', 'list'),\n"
        "}));\n"
    ),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_host_secrets_are_out_of_reach(stack, language):
    result = finish(stack, language, PROBE[language])

    assert result["phase"] == "succeeded", result
    found = json.loads(result["stdout"])
    assert found["shadow"].startswith("denied:")
    assert found["docker_sock"].startswith("denied:")
    assert found["root_home"] in (
        "read:[]",
        "denied:PermissionError",
        "denied:EACCES",
    ) or found["root_home"].startswith("denied:")
    for key in ("init_environ", "environ"):
        assert stack.jwt_secret not in found[key]
        assert "ENCLAVE_" not in found[key]
    assert stack.jwt_secret not in json.dumps(result)


CONNECT = {
    "python": (
        "import json, os, socket\n"
        "interfaces = sorted(os.listdir('/sys/class/net')) if os.path.isdir('/sys/class/net') else None\n"
        "out = {'interfaces': interfaces}\n"
        "if interfaces in (['lo'], None):\n"
        "    for name, addr in (('redis', ('127.0.0.1', PORT)), ('default', ('127.0.0.1', 6379)), ('outside', ('192.0.2.1', 80))):\n"
        "        s = socket.socket()\n"
        "        s.settimeout(2)\n"
        "        try:\n"
        "            s.connect(addr)\n"
        "            out[name] = 'connected'\n"
        "        except OSError as e:\n"
        "            out[name] = type(e).__name__ + ':' + str(e.errno)\n"
        "        finally:\n"
        "            s.close()\n"
        "print(json.dumps(out))\n"
    ),
    "node": (
        "const fs = require('fs');\n"
        "const net = require('net');\n"
        "const interfaces = fs.existsSync('/sys/class/net') ? fs.readdirSync('/sys/class/net').sort() : null;\n"
        "const out = { interfaces };\n"
        "const targets = [['redis', '127.0.0.1', PORT], ['default', '127.0.0.1', 6379], ['outside', '192.0.2.1', 80]];\n"
        "function next(i) {\n"
        "  if (i === targets.length) { console.log(JSON.stringify(out)); return; }\n"
        "  const [name, host, port] = targets[i];\n"
        "  const socket = net.connect({ host, port, timeout: 2000 });\n"
        "  socket.on('connect', () => { out[name] = 'connected'; socket.destroy(); next(i + 1); });\n"
        "  socket.on('timeout', () => { out[name] = 'timeout'; socket.destroy(); next(i + 1); });\n"
        "  socket.on('error', (e) => { out[name] = 'error:' + e.code; next(i + 1); });\n"
        "}\n"
        "if (interfaces === null || JSON.stringify(interfaces) === '[\"lo\"]') next(0);\n"
        "else console.log(JSON.stringify(out));\n"
    ),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_network_reaches_the_host_or_the_outside(stack, language):
    port = urlparse(stack.redis_url).port
    code = CONNECT[language].replace("PORT", str(port))

    result = finish(stack, language, code)

    found = json.loads(result["stdout"])
    assert found["interfaces"] in (["lo"], None), found
    for name in ("redis", "default", "outside"):
        assert found[name] != "connected", found


SLEEPER = {
    "python": "import time\nprint('up', flush=True)\ntime.sleep(120)\n",
    "node": "console.log('up');\nsetTimeout(() => {}, 120000);\n",
}


def sandbox_remains(backend: str, session_id: str) -> bool:
    if backend == "docker":
        containers = docker.from_env().containers.list(
            all=True, filters={"label": f"enclave.session_id={session_id}"}
        )
        return bool(containers)
    return live_processes_of(sandbox_uid(backend, session_id)) > 0


@pytest.mark.parametrize("language", LANGUAGES)
def test_delete_of_a_running_session_kills_it_and_removes_the_sandbox(stack, language):
    client, session_id = start(stack, language, SLEEPER[language])
    for event in stack.stream(session_id, stack.token("org_sbx"), timeout=60):
        if event.event == "stdout":
            break
    assert sandbox_remains(stack.backend, session_id)

    first = client.delete(f"/sessions/{session_id}")
    second = client.delete(f"/sessions/{session_id}")

    assert first.status_code == second.status_code == 200
    assert first.json()["phase"] == "killed"
    assert first.json()["kill_reason"] == "teardown"
    assert first.json() == second.json()
    deadline = time.monotonic() + 15
    while sandbox_remains(stack.backend, session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sandbox_remains(stack.backend, session_id)
