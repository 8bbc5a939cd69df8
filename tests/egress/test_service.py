"""Egress end to end through the HTTP API: local and docker backends, Python and Node.

Each backend gets a stack of its own (gunicorn, RQ workers, reaper and the
egress proxy, real PostgreSQL and Redis) for the whole module. Sessions run
real code in real sandboxes and reach the upstreams of `tests.egress.upstreams`
(HTTPS and HTTP on a loopback address of their own) by the test names the
resolver override maps to it. What the code saw, what the upstreams
received, and what the API, the event stream, the audit trail, the logs and
the database hold are all checked.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import tempfile
import time

import psycopg2
import pytest
import redis

from tests.egress.conftest import BINDING_NAME, BOUND_ORG
from tests.servers import redis_url_with_db
from tests.stack import ServiceStack

DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
TERMINAL = {"succeeded", "failed", "killed"}
LANGUAGES = ["python", "node"]
ORG = "org_egress"
REDIS_DB = 13
LIMITS = {"timeout_s": 60, "memory_mb": 512, "output_bytes": 8 * 1024 * 1024}


@pytest.fixture(scope="module", params=["local", "docker"])
def stack(request, postgres_server, redis_url, tmp_path_factory, egress_env):
    backend = request.param
    env = dict(egress_env)
    if backend == "local":
        rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
        if not os.path.isfile(os.path.join(rootfs, "usr/bin/python3")):
            pytest.fail(
                f"no sandbox root filesystem at {rootfs}: build it with "
                "`enclave/sandbox/build-image.sh --rootfs DIR` and name it in "
                "ENCLAVE_TEST_SANDBOX_ROOTFS",
                pytrace=False,
            )
        env["ENCLAVE_SANDBOX_ROOTFS"] = rootfs
    # bwrap binds each session's egress directory as the session's own uid,
    # which cannot pass through pytest's private temporary directories.
    sessions_dir = tempfile.mkdtemp(prefix="enclave-egress-test-")
    os.chmod(sessions_dir, 0o711)
    env["ENCLAVE_EGRESS_SESSIONS_DIR"] = sessions_dir
    url = redis_url_with_db(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    service = ServiceStack(
        database_url=postgres_server.url_for(postgres_server.create_database()),
        redis_url=url,
        workdir=tmp_path_factory.mktemp(f"egress-{backend}"),
        backend=backend,
        workers=2,
        egress=True,
        env=env,
    )
    try:
        with service:
            health = service.wait_healthy(90)
            assert health["backend"]["ok"], health
            yield service
    finally:
        shutil.rmtree(sessions_dir, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------


def start(stack, language, code, org=ORG, **body):
    client = stack.client(stack.token(org))
    response = client.post(
        "/sessions",
        json={"language": language, "code": code, "limits": LIMITS, **body},
    )
    assert response.status_code == 201, response.text
    return client, response.json()["id"]


def finish(stack, language, code, org=ORG, **body):
    """Run a session to its end: (result, events, client, session id)."""
    client, session_id = start(stack, language, code, org=org, **body)
    events = list(stack.stream(session_id, stack.token(org), timeout=120))
    result = client.get(f"/sessions/{session_id}/result").json()
    assert result["phase"] == "succeeded", (
        f"{result['phase']} {result['error']}\n{result['stderr']}\n{stack.log_tails()}"
    )
    return result, events, client, session_id


def last_json_line(result) -> dict:
    lines = [line for line in result["stdout"].splitlines() if line.startswith("{")]
    assert lines, result
    return json.loads(lines[-1])


def egress_counts(result) -> dict[tuple[str, bool], int]:
    return {(e["host"], e["allowed"]): e["attempts"] for e in result["egress"]}


def denied_audit(client, session_id) -> list[dict]:
    audit = client.get(f"/sessions/{session_id}/audit").json()["events"]
    return [e["detail"] for e in audit if e["action"] == "egress.denied"]


def connect_from_host(stack, target: str, session_id: str, token: str) -> int:
    """CONNECT through the proxy's own port from the test; the answer's status."""
    credentials = base64.b64encode(f"{session_id}:{token}".encode()).decode()
    with socket.create_connection(("127.0.0.1", stack.egress_port), 10) as s:
        s.sendall(
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def wait_for_stdout(stack, session_id, org, marker):
    for event in stack.stream(session_id, stack.token(org), timeout=60):
        if event.event == "stdout" and marker in event.data["data"]:
            return event.data["data"]
    raise AssertionError(f"{marker!r} never appeared on {session_id}'s stdout")


def proxy_credentials(line: str) -> tuple[str, str]:
    """(session id, token) from a proxy URL the code printed."""
    url = line.split("PROXY=", 1)[1].split()[0]
    userinfo = url.split("//", 1)[1].split("@", 1)[0]
    session_id, token = userinfo.split(":", 1)
    return session_id, token


# -- code run in the sandboxes -------------------------------------------------------

PY_FETCH = """
import json, urllib.error, urllib.request

def fetch(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return f"{response.status} {response.read().decode().strip()}"
    except urllib.error.HTTPError as e:
        return f"http {e.code} {e.headers.get('X-Enclave-Egress-Reason')}"
    except Exception as e:
        return f"error {type(e).__name__}: {e}"
"""

PY_RAW = """
import socket

def raw(address, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((address, port))
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}"
    finally:
        s.close()
"""

NODE_FETCH = """
const http = require('http');
const https = require('https');
const net = require('net');

function get(url, headers) {
  const mod = url.startsWith('https:') ? https : http;
  return new Promise((resolve) => {
    const req = mod.get(url, { headers: headers || {} }, (res) => {
      let body = '';
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve(`${res.statusCode} ${body.trim()}`));
    });
    req.on('error', (e) => resolve(`error ${e.message}`));
    req.setTimeout(20000, () => req.destroy(new Error('timeout')));
  });
}

async function viaFetch(url, headers) {
  try {
    const response = await fetch(url, { headers: headers || {} });
    return `${response.status} ${(await response.text()).trim()}`;
  } catch (e) {
    return `error ${e.message} ${e.cause ? e.cause.message : ''}`;
  }
}

function raw(host, port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, timeout: 3000 });
    socket.on('connect', () => { socket.destroy(); resolve('connected'); });
    socket.on('timeout', () => { socket.destroy(); resolve('timeout'); });
    socket.on('error', (e) => resolve(e.code));
  });
}
"""


def allowed_code(language, upstream_address, proxy_port):
    if language == "python":
        return (
            PY_FETCH
            + PY_RAW
            + f"""
out = {{}}
out["https"] = fetch("https://api.test/hello")
out["http"] = fetch("http://api.test/hello")
print("MARK-allowed", flush=True)
out["denied_https"] = fetch("https://other.test/hello")
print("MARK-denied", flush=True)
out["denied_http"] = fetch("http://other.test/hello")
out["raw"] = [raw("{upstream_address}", 443), raw("{upstream_address}", 80),
              raw("127.0.0.1", {proxy_port})]
print(json.dumps(out))
"""
        )
    return (
        NODE_FETCH
        + f"""
(async () => {{
  const out = {{}};
  out.https = await get('https://api.test/hello');
  out.http = await get('http://api.test/hello');
  out.fetch_https = await viaFetch('https://api.test/hello');
  out.fetch_http = await viaFetch('http://api.test/hello');
  console.log('MARK-allowed');
  out.denied_https = await get('https://other.test/hello');
  console.log('MARK-denied');
  out.denied_fetch = await viaFetch('http://other.test/hello');
  out.raw = [await raw('{upstream_address}', 443), await raw('{upstream_address}', 80),
             await raw('127.0.0.1', {proxy_port})];
  console.log(JSON.stringify(out));
  process.exit(0);
}})();
"""
    )


# -- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
def test_egress_without_allow_list_reaches_nothing(stack, upstreams, language):
    if language == "python":
        code = (
            PY_FETCH
            + PY_RAW
            + f"""
import os
print(json.dumps({{
    "https": fetch("https://api.test/hello"),
    "proxy": [k for k in os.environ if "proxy" in k.lower()],
    "mounted": os.path.exists("/run/enclave"),
    "raw": [raw("{upstreams.address}", 443), raw("127.0.0.1", 3128)],
}}))
"""
        )
    else:
        code = (
            NODE_FETCH
            + f"""
(async () => {{
  console.log(JSON.stringify({{
    https: await get('https://api.test/hello'),
    fetch: await viaFetch('https://api.test/hello'),
    proxy: Object.keys(process.env).filter((k) => k.toLowerCase().includes('proxy')),
    mounted: require('fs').existsSync('/run/enclave'),
    raw: [await raw('{upstreams.address}', 443), await raw('127.0.0.1', 3128)],
  }}));
  process.exit(0);
}})();
"""
        )
    seen_before = len(upstreams.requests())

    result, events, _, _ = finish(stack, language, code)

    found = last_json_line(result)
    assert found["https"].startswith("error"), found
    assert found.get("fetch", "error").startswith("error"), found
    assert found["proxy"] == [] and found["mounted"] is False, found
    assert "connected" not in found["raw"], found
    assert result["egress"] == []
    assert not [e for e in events if e.event == "egress"]
    assert len(upstreams.requests()) == seen_before


@pytest.mark.parametrize("language", LANGUAGES)
def test_egress_allow_list_admits_listed_host_and_reports_every_attempt(
    stack, upstreams, language
):
    code = allowed_code(language, upstreams.address, stack.egress_port)

    result, events, client, session_id = finish(
        stack, language, code, egress={"allow": ["api.test"]}
    )

    found = last_json_line(result)
    assert found["https"] == "200 hello api.test https", found
    assert found["http"] == "200 hello api.test http", found
    assert "403" in found["denied_https"], found
    if language == "python":
        assert found["denied_http"] == "http 403 host_not_allowed", found
        allowed_attempts = 2
    else:
        assert found["fetch_https"] == "200 hello api.test https", found
        assert found["fetch_http"] == "200 hello api.test http", found
        assert "host_not_allowed" in found["denied_https"], found
        assert "403" in found["denied_fetch"], found
        allowed_attempts = 4
    assert "connected" not in found["raw"], found

    assert egress_counts(result) == {
        ("api.test", True): allowed_attempts,
        ("other.test", False): 2,
    }
    egress_events = [e for e in events if e.event == "egress"]
    assert {(e.data["host"], e.data["allowed"]) for e in egress_events} == {
        ("api.test", True),
        ("other.test", False),
    }
    assert all(e.data["at"] for e in egress_events)
    # Reported before the answer reached the code: the event precedes the
    # output the code wrote after the refusal.
    first_denial = min(e.seq for e in egress_events if not e.data["allowed"])
    marker = min(
        e.seq for e in events if e.event == "stdout" and "MARK-denied" in e.data["data"]
    )
    assert first_denial < marker
    assert (
        denied_audit(client, session_id)
        == [{"host": "other.test", "reason": "host_not_allowed"}] * 2
    )
    hello = [s for s in upstreams.requests("/hello") if "other.test" in s.host]
    assert hello == []


def test_egress_refuses_subdomain_parent_ports_and_private_addresses(stack, upstreams):
    code = """
import base64, http.client, json, os, socket, ssl, urllib.parse

proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
auth = "Basic " + base64.b64encode(
    f"{proxy.username}:{proxy.password}".encode()).decode()

def tunnel(target):
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=20)
    s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n"
              f"Proxy-Authorization: {auth}\\r\\n\\r\\n".encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    lines = head.decode("latin-1").split("\\r\\n")
    reason = [l.split(":", 1)[1].strip() for l in lines
              if l.lower().startswith("x-enclave-egress-reason:")]
    return s, [int(lines[0].split()[1]), reason[0] if reason else None]

def connect(target):
    s, answer = tunnel(target)
    s.close()
    return answer

def absolute(url):
    c = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=20)
    c.request("GET", url, headers={"Proxy-Authorization": auth})
    r = c.getresponse()
    r.read()
    return [r.status, r.headers.get("X-Enclave-Egress-Reason")]

out = {t: connect(t) for t in [
    "a.svc.test:443", "svc.test:443", "api.test:22", "127.0.0.1:443",
    "[::1]:443", "2130706433:443", "0x7f000001:443", "localhost:443",
    "private.test:443", "metadata.test:80"]}
out["abs_literal"] = absolute("http://127.0.0.1/hello")
out["abs_sub"] = absolute("http://a.svc.test/hello")

s, _ = tunnel("api.test:80")
s.sendall(b"GET /hello HTTP/1.1\\r\\nHost: other.test\\r\\n"
          b"Connection: close\\r\\n\\r\\n")
answer = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    answer += chunk
out["host_mismatch"] = answer.split(b"\\r\\n", 1)[0].decode()

s, _ = tunnel("api.test:443")
try:
    ssl.create_default_context().wrap_socket(s, server_hostname="other.test")
    out["sni_mismatch"] = "handshake"
except (OSError, ssl.SSLError) as e:
    out["sni_mismatch"] = type(e).__name__

s, _ = tunnel("a.svc.test:443")
t = ssl.create_default_context().wrap_socket(s, server_hostname="a.svc.test")
issuer = dict(x[0] for x in t.getpeercert()["issuer"])
t.sendall(b"GET /hello HTTP/1.1\\r\\nHost: a.svc.test\\r\\n"
          b"Connection: close\\r\\n\\r\\n")
body = b""
while True:
    chunk = t.recv(4096)
    if not chunk:
        break
    body += chunk
out["passthrough"] = [issuer["commonName"], body.split(b"\\r\\n", 1)[0].decode()]
print(json.dumps(out))
"""
    allow = [
        "*.svc.test",
        "api.test",
        "127.0.0.1",
        "localhost",
        "2130706433",
        "private.test",
        "metadata.test",
    ]

    result, _, client, session_id = finish(
        stack, "python", code, egress={"allow": allow}
    )

    found = last_json_line(result)
    assert found["a.svc.test:443"] == [200, None], found
    assert found["svc.test:443"] == [403, "host_not_allowed"], found
    assert found["api.test:22"] == [403, "port_not_allowed"], found
    for literal in ("127.0.0.1:443", "[::1]:443", "2130706433:443", "0x7f000001:443"):
        assert found[literal] == [403, "ip_literal"], (literal, found)
    for private in ("localhost:443", "private.test:443", "metadata.test:80"):
        assert found[private] == [403, "private_address"], (private, found)
    assert found["abs_literal"] == [403, "ip_literal"], found
    assert found["abs_sub"][0] == 200, found
    assert found["host_mismatch"].startswith("HTTP/1.1 403"), found
    assert found["sni_mismatch"] != "handshake", found
    # Passed through untouched: the host's own certificate, not the proxy's.
    assert found["passthrough"] == ["egress test CA", "HTTP/1.1 200 OK"], found

    denials = denied_audit(client, session_id)
    reasons = {(d["host"], d["reason"]) for d in denials}
    assert ("svc.test", "host_not_allowed") in reasons
    assert ("api.test", "port_not_allowed") in reasons
    assert ("2130706433", "ip_literal") in reasons
    assert ("private.test", "private_address") in reasons
    assert ("other.test", "host_mismatch") in reasons
    assert ("other.test", "sni_mismatch") in reasons
    counts = egress_counts(result)
    assert counts[("a.svc.test", True)] == 3
    assert counts[("metadata.test", False)] == 1
    assert len(denials) == sum(n for (_, ok), n in counts.items() if not ok)
    # Nothing refused was ever dialed: only the allowed paths reached a host.
    assert not [s for s in upstreams.requests() if "other.test" in s.host]


def test_egress_node_wildcards_and_refusals(stack):
    code = (
        NODE_FETCH
        + """
(async () => {
  console.log(JSON.stringify({
    sub: await get('https://a.svc.test/hello'),
    sub_fetch: await viaFetch('https://a.svc.test/hello'),
    parent: await get('https://svc.test/hello'),
    port: await get('https://api.test:22/hello'),
    private: await viaFetch('https://private.test/hello'),
  }));
  process.exit(0);
})();
"""
    )

    result, _, _, _ = finish(
        stack,
        "node",
        code,
        egress={"allow": ["*.svc.test", "api.test", "private.test"]},
    )

    found = last_json_line(result)
    assert found["sub"] == "200 hello a.svc.test https", found
    assert found["sub_fetch"] == "200 hello a.svc.test https", found
    assert "403" in found["parent"] and "host_not_allowed" in found["parent"], found
    assert "port_not_allowed" in found["port"], found
    assert "private_address" in found["private"], found


@pytest.mark.parametrize("language", LANGUAGES)
def test_egress_binding_injects_credential_the_sandbox_never_holds(
    stack, upstreams, binding_secret, postgres_server, language
):
    mark = f"binding-{language}-{time.monotonic_ns()}"
    if language == "python":
        code = (
            PY_FETCH
            + f"""
import base64, http.client, os, urllib.parse

out = {{"plain": fetch("https://api.test/hello?{mark}=urllib",
                       {{"Authorization": "Bearer sandbox-own-value"}})}}
proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
auth = "Basic " + base64.b64encode(
    f"{{proxy.username}}:{{proxy.password}}".encode()).decode()
c = http.client.HTTPSConnection(proxy.hostname, proxy.port, timeout=20)
c.set_tunnel("api.test", 443, headers={{"Proxy-Authorization": auth}})
c.request("GET", "/hello?{mark}=client", headers={{"Authorization": "mine"}})
r = c.getresponse()
out["client"] = f"{{r.status}} {{r.read().decode().strip()}}"
out["issuer"] = dict(x[0] for x in c.sock.getpeercert()["issuer"])["commonName"]
print(json.dumps(out), flush=True)

# Everything the sandbox can read, for the test to search.
dump = {{"environ": dict(os.environ), "proc": {{}}, "files": {{}}}}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{{pid}}/{{name}}", "rb") as f:
                    dump["proc"][f"{{pid}}/{{name}}"] = f.read().decode("latin-1")
            except OSError:
                pass
for top in ("/run", "/workspace", "/tmp", "/home", "/etc"):
    for root, _, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    dump["files"][path] = f.read(2_000_000).decode("latin-1")
            except OSError:
                pass
print("DUMP " + json.dumps(dump))
"""
        )
    else:
        code = (
            NODE_FETCH
            + f"""
(async () => {{
  const own = {{ Authorization: 'Bearer sandbox-own-value' }};
  const out = {{
    https: await get('https://api.test/hello?{mark}=https', own),
    fetch: await viaFetch('https://api.test/hello?{mark}=fetch', own),
  }};
  console.log(JSON.stringify(out));
  const fs = require('fs');
  const dump = {{ environ: process.env, proc: {{}} }};
  for (const pid of fs.readdirSync('/proc').filter((p) => /^\\d+$/.test(p))) {{
    for (const name of ['environ', 'cmdline']) {{
      try {{
        dump.proc[`${{pid}}/${{name}}`] =
          fs.readFileSync(`/proc/${{pid}}/${{name}}`, 'latin1');
      }} catch (e) {{}}
    }}
  }}
  console.log('DUMP ' + JSON.stringify(dump));
  process.exit(0);
}})();
"""
        )

    result, events, client, session_id = finish(
        stack,
        language,
        code,
        org=BOUND_ORG,
        egress={"allow": ["api.test"]},
        service_bindings=[BINDING_NAME],
    )

    found = json.loads(
        next(line for line in result["stdout"].splitlines() if line.startswith("{"))
    )
    assert "DUMP " in result["stdout"] and not result["output_truncated"]
    received = [s for s in upstreams.requests() if mark in s.path]
    if language == "python":
        assert found["plain"] == "200 hello api.test https", found
        assert found["client"] == "200 hello api.test https", found
        # Intercepted: the certificate is the deployment's proxy CA's.
        assert found["issuer"] != "egress test CA", found
        assert len(received) == 2
    else:
        assert found["https"] == "200 hello api.test https", found
        assert found["fetch"] == "200 hello api.test https", found
        assert len(received) == 2
    for seen in received:
        assert seen.headers["authorization"] == f"Bearer {binding_secret}"
        assert "proxy-authorization" not in seen.headers
    assert egress_counts(result) == {("api.test", True): 2}

    assert_secret_absent(stack, binding_secret, client, session_id, postgres_server)
    assert binding_secret not in result["stdout"]
    assert binding_secret not in json.dumps([e.data for e in events])


def assert_secret_absent(stack, secret, client, session_id, postgres_server):
    """The binding's value is in no response, log, database row or Redis key."""
    responses = [
        client.get(f"/sessions/{session_id}").text,
        client.get(f"/sessions/{session_id}/result").text,
        client.get(f"/sessions/{session_id}/audit").text,
        client.get("/sessions").text,
    ]
    for text in responses:
        assert secret not in text
    assert secret not in stack.logs()

    with (
        psycopg2.connect(stack.database_url) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public'"
        )
        tables = [row[0] for row in cursor.fetchall()]
        assert {"session", "session_event", "audit_event"} <= set(tables), tables
        for table in tables:
            # Every table, whole: the names come from the catalog.
            cursor.execute(f'SELECT row_to_json(t)::text FROM "{table}" t')
            for (row,) in cursor.fetchall():
                assert secret not in row, table

    client_redis = redis.Redis.from_url(stack.redis_url)
    for key in client_redis.scan_iter():
        assert secret.encode() not in key
        if client_redis.type(key) == b"string":
            assert secret.encode() not in (client_redis.get(key) or b"")


def test_egress_token_belongs_to_its_session_and_dies_with_it(stack, upstreams):
    sleeper = (
        "import os, time\n"
        "print('PROXY=' + os.environ['HTTPS_PROXY'], flush=True)\n"
        "time.sleep(50)\n"
    )
    client_a, session_a = start(
        stack, "python", sleeper, egress={"allow": ["api.test"]}
    )
    line = wait_for_stdout(stack, session_a, ORG, "PROXY=")
    id_a, token_a = proxy_credentials(line)
    assert id_a == session_a

    # While A runs, its credentials work, and only together.
    assert connect_from_host(stack, "api.test:443", id_a, token_a) == 200
    assert connect_from_host(stack, "api.test:443", id_a, token_a + "x") == 407
    assert connect_from_host(stack, "api.test:443", "ses_unknown", token_a) == 407

    code_b = f"""
import base64, json, os, socket, urllib.parse

proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])

def connect(target, session_id, token):
    auth = base64.b64encode(f"{{session_id}}:{{token}}".encode()).decode()
    s = socket.create_connection((proxy.hostname, proxy.port), timeout=20)
    s.sendall(f"CONNECT {{target}} HTTP/1.1\\r\\nHost: {{target}}\\r\\n"
              f"Proxy-Authorization: Basic {{auth}}\\r\\n\\r\\n".encode())
    head = s.recv(4096)
    s.close()
    return int(head.split(b" ", 2)[1])

out = {{
    "own_token_other_session": connect("api.test:443", "{id_a}", proxy.password),
    "other_token_own_session": connect("api.test:443", proxy.username, "{token_a}"),
    "own_policy": connect("api.test:443", proxy.username, proxy.password),
    "own_allowed": connect("other.test:443", proxy.username, proxy.password),
}}
print(json.dumps(out))
print("PROXY=" + os.environ["HTTPS_PROXY"])
"""
    result_b, _, _, session_b = finish(
        stack, "python", code_b, egress={"allow": ["other.test"]}
    )

    found = last_json_line(result_b)
    assert found == {
        "own_token_other_session": 407,
        "other_token_own_session": 407,
        "own_policy": 403,
        "own_allowed": 200,
    }, found
    # A session that ended: its token is refused.
    id_b, token_b = proxy_credentials(
        next(line for line in result_b["stdout"].splitlines() if "PROXY=" in line)
    )
    assert id_b == session_b
    assert connect_from_host(stack, "other.test:443", id_b, token_b) == 407

    assert client_a.delete(f"/sessions/{session_a}").status_code == 200
    deadline = time.monotonic() + 15
    status = connect_from_host(stack, "api.test:443", id_a, token_a)
    while status != 407 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = connect_from_host(stack, "api.test:443", id_a, token_a)
    assert status == 407
    # The tokens went only where the code put them (its own output above).
    logs = stack.logs()
    assert token_a not in logs and token_b not in logs


def test_egress_pip_downloads_through_the_proxy(stack, upstreams):
    code = """
import glob, json, os, subprocess, sys

wheel = glob.glob("/usr/share/python-wheels/pip-*.whl")[0]
completed = subprocess.run(
    [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
     "--disable-pip-version-check", "--retries", "0", "--timeout", "20",
     "--index-url", "https://api.test/simple/", "-d", "/tmp/dl", "demo"],
    env=dict(os.environ, PYTHONPATH=wheel), capture_output=True, text=True,
)
print(json.dumps({
    "code": completed.returncode,
    "files": sorted(os.listdir("/tmp/dl")) if os.path.isdir("/tmp/dl") else [],
    "stderr": completed.stderr[-1500:],
}))
"""

    result, _, _, _ = finish(stack, "python", code, egress={"allow": ["api.test"]})

    found = last_json_line(result)
    assert found["code"] == 0, found
    assert found["files"] == ["demo-1.0-py3-none-any.whl"], found


def test_egress_unknown_binding_is_refused_and_known_one_accepted(stack):
    other = stack.client(stack.token(ORG))
    bound = stack.client(stack.token(BOUND_ORG))
    body = {"language": "python", "code": "print(1)", "egress": {"allow": ["api.test"]}}

    unknown = other.post("/sessions", json={**body, "service_bindings": [BINDING_NAME]})
    known = bound.post("/sessions", json={**body, "service_bindings": [BINDING_NAME]})
    missing = bound.post("/sessions", json={**body, "service_bindings": ["nope"]})

    assert unknown.status_code == 422, unknown.text
    assert "service_bindings" in unknown.json()["errors"]["json"]
    assert known.status_code == 201, known.text
    assert known.json()["service_bindings"] == [BINDING_NAME]
    assert missing.status_code == 422, missing.text
    # Let the accepted one end before the stack does.
    list(stack.stream(known.json()["id"], stack.token(BOUND_ORG), timeout=60))
