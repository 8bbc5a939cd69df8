"""Private git sources end to end through the HTTP API, on the local and docker backends.

Each backend gets a stack of its own for the whole module (gunicorn, RQ
workers, the egress proxy, real PostgreSQL and Redis). Beside it run, in this
process, the GitHub App API stand-in (`tests.github_app`, on 127.0.0.1) and
the git smart-HTTP server (`tests.gitserver.GitHTTPApp`) on port 443 of a
loopback address of its own, which the resolver override names `git.test`,
so that the clone step reaches it through the egress proxy the way it would
reach github.com. One throwaway CA signs both servers' certificate; the
deployment trusts it for the API (`ENCLAVE_GIT_CA_BUNDLE`) and the sandboxes
through the egress bundle (`ENCLAVE_EGRESS_EXTRA_CA_FILE`).

Repositories, installations and grants:

| repository   | installation         | entitled org                 |
|--------------|----------------------|------------------------------|
| acme/app     | 42 (acme)            | org_a (owner acme)           |
| beta/secret  | 77 (beta)            | org_b (installation 77)      |
| frozen/vault | 99 (frozen), suspended | org_c (repository)         |
| acme/missing | (does not exist)     | org_c (repository)           |
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import tempfile
import threading
import zlib
from pathlib import Path

import psycopg2
import pytest
import redis
from werkzeug.serving import make_server

from tests.egress.upstreams import TestAuthority as Authority
from tests.egress.upstreams import _random_loopback
from tests.github_app import GitHubStandIn, generate_app_key
from tests.gitserver import GitHostError, GitHTTPApp, create_repository, require_git
from tests.servers import free_port, redis_url_with_db
from tests.stack import ServiceStack

DEFAULT_ROOTFS = "/var/lib/enclave/rootfs"
GIT_HOST = "git.test"
APP_ID = "4242"
REDIS_DB = 11
LIMITS = {"timeout_s": 60, "memory_mb": 512, "output_bytes": 8 * 1024 * 1024}
ENTITLEMENTS = {
    "orgs": {
        "org_a": {"owners": ["acme"]},
        "org_b": {"installations": [77]},
        "org_c": {"repositories": ["frozen/vault", "acme/missing"]},
    }
}


class GitWorld:
    """The git host and the GitHub App API the stacks of this module talk to."""

    def __init__(self, directory: Path) -> None:
        try:
            require_git()
        except GitHostError as exc:
            pytest.fail(str(exc), pytrace=False)
        if os.geteuid() != 0:
            pytest.fail("the git source tests serve port 443 and must run as root")
        self.authority = Authority(directory / "ca", [GIT_HOST, "localhost"])
        self.private_key, public_key = generate_app_key()
        root = directory / "repositories"
        self.repositories = {
            name: create_repository(root, *name.split("/"))
            for name in ("acme/app", "beta/secret", "frozen/vault")
        }
        self.github = GitHubStandIn(app_id=APP_ID, public_key=public_key)
        for name in self.repositories:
            self.github.add_repository(*name.split("/"))
        self.github.install(42, "acme", ["acme/app"])
        self.github.install(77, "beta", ["beta/secret"])
        self.github.install(99, "frozen", ["frozen/vault"], suspended=True)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.authority.cert_file, self.authority.key_file)
        self.address = _random_loopback()
        self.git = GitHTTPApp(root, self.github.authorize_git)
        self.api_port = free_port()
        self._servers = [
            make_server(
                self.address, 443, self.git, threaded=True, ssl_context=context
            ),
            make_server(
                "127.0.0.1",
                self.api_port,
                self.github.api_app(),
                threaded=True,
                ssl_context=context,
            ),
        ]
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()

    def environment(self) -> dict[str, str]:
        return {
            "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": json.dumps({GIT_HOST: self.address}),
            "ENCLAVE_EGRESS_EXTRA_CA_FILE": str(self.authority.ca_file),
            "ENCLAVE_GITHUB_APP_ID": APP_ID,
            "ENCLAVE_GITHUB_APP_PRIVATE_KEY": self.private_key,
            "ENCLAVE_GITHUB_API_URL": f"https://localhost:{self.api_port}",
            "ENCLAVE_GITHUB_HOST": GIT_HOST,
            "ENCLAVE_GIT_CA_BUNDLE": str(self.authority.ca_file),
            "ENCLAVE_GIT_ENTITLEMENTS": json.dumps(ENTITLEMENTS),
        }

    def stop(self) -> None:
        self.github.stop()
        self.git.stop()
        for server in self._servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    built = GitWorld(tmp_path_factory.mktemp("git-world"))
    yield built
    built.stop()


@pytest.fixture(scope="module", params=["local", "docker"])
def stack(request, postgres_server, redis_url, tmp_path_factory, world):
    backend = request.param
    env = world.environment()
    if backend == "local":
        rootfs = os.environ.get("ENCLAVE_TEST_SANDBOX_ROOTFS", DEFAULT_ROOTFS)
        if not os.path.isfile(os.path.join(rootfs, "usr/bin/git")):
            pytest.fail(
                f"no sandbox root filesystem with git at {rootfs}: build it with "
                "`enclave/sandbox/build-image.sh --rootfs DIR` and name it in "
                "ENCLAVE_TEST_SANDBOX_ROOTFS",
                pytrace=False,
            )
        env["ENCLAVE_SANDBOX_ROOTFS"] = rootfs
    # bwrap binds the egress directories and checkouts as the session's own
    # uid, which cannot pass through pytest's private temporary directories.
    sessions_dir = tempfile.mkdtemp(prefix="enclave-git-test-")
    os.chmod(sessions_dir, 0o711)
    env["ENCLAVE_EGRESS_SESSIONS_DIR"] = sessions_dir
    url = redis_url_with_db(redis_url, REDIS_DB)
    redis.Redis.from_url(url).flushdb()
    database_url = postgres_server.url_for(postgres_server.create_database())
    service = ServiceStack(
        database_url=database_url,
        redis_url=url,
        workdir=tmp_path_factory.mktemp(f"git-{backend}"),
        backend=backend,
        workers=2,
        egress=True,
        env=env,
    )
    service.database_url = database_url
    try:
        with service:
            health = service.wait_healthy(90)
            assert health["backend"]["ok"], health
            yield service
    finally:
        shutil.rmtree(sessions_dir, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------


def run(stack, code, *, org="org_a", repository="acme/app", ref="main", **body):
    """Run a session to its end: (result, session, audit, events, client)."""
    client = stack.client(stack.token(org))
    source = {"git": {"url": repo_url(repository), "ref": ref}}
    response = client.post(
        "/sessions",
        json={
            "language": "python",
            "code": code,
            "limits": LIMITS,
            "source": source,
            **body,
        },
    )
    assert response.status_code == 201, response.text
    created = response.json()
    session_id = created["id"]
    events = list(stack.stream(session_id, stack.token(org), timeout=120))
    result = client.get(f"/sessions/{session_id}/result")
    assert result.status_code == 200, result.text
    session = client.get(f"/sessions/{session_id}").json()
    audit = client.get(f"/sessions/{session_id}/audit").json()["events"]
    return result.json(), session, audit, events, client, [response.text]


def repo_url(repository: str) -> str:
    return f"https://{GIT_HOST}/{repository}.git"


def succeeded(result, stack) -> dict:
    assert result["phase"] == "succeeded", (
        f"{result['phase']} {result.get('error')}\n{result['stderr']}\n"
        f"{stack.log_tails()}"
    )
    lines = [line for line in result["stdout"].splitlines() if line.startswith("{")]
    assert lines, result
    return json.loads(lines[-1])


def database_text(stack) -> str:
    """Every row of every table of the stack's database, as text."""
    chunks = []
    with (
        psycopg2.connect(stack.database_url) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public'"
        )
        for (table,) in cursor.fetchall():
            cursor.execute(f'SELECT * FROM "{table}"')
            chunks.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(chunks)


def logs_text(stack) -> str:
    return "\n".join(
        path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")
    )


def refused_rows(stack, org: str) -> list[dict]:
    with (
        psycopg2.connect(stack.database_url) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT action, detail FROM audit_event WHERE chain = %s",
            (f"org:{org}",),
        )
        return [
            {"action": action, "detail": _decoded(detail)}
            for action, detail in cursor.fetchall()
        ]


def _decoded(detail):
    # The column holds JSON text, which the driver may hand over still encoded.
    while isinstance(detail, str):
        detail = json.loads(detail)
    return detail


# -- code run in the sandboxes ---------------------------------------------------------

READ_CHECKOUT = """
import json, os
print(json.dumps({
    "cwd": os.getcwd(),
    "version": open("VERSION").read().strip(),
    "files": sorted(os.listdir(".")),
    "code": __file__,
}))
"""

# Reads everything the workload can that was not in the image before the
# session started, and hands it back compressed for the test to search.
SCAN = """
import base64, json, os, zlib

found = bytearray()
count = 0

def take(path):
    global count
    try:
        with open(path, "rb") as f:
            found.extend(f.read(4 * 1024 * 1024))
            found.extend(b"\\n")
        count += 1
    except OSError:
        pass

for key, value in os.environ.items():
    found.extend(f"{key}={value}\\n".encode())
for entry in os.listdir("/proc"):
    if entry.isdigit():
        take(f"/proc/{entry}/environ")
        take(f"/proc/{entry}/cmdline")
git_files = 0
for top in ("/workspace", "/tmp", "/run", "/dev/shm", "/var", "/home", "/root", "/opt"):
    for directory, _, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            if "/.git" in path:
                git_files += 1
            take(path)
blob = base64.b64encode(zlib.compress(bytes(found), 9)).decode()
print(json.dumps({"files": count, "git_files": git_files, "blob": blob}))
"""

REACH_GIT_HOST = """
import json, urllib.error, urllib.request
try:
    with urllib.request.urlopen("https://git.test/acme/app.git/info/refs"
                                "?service=git-upload-pack", timeout=20) as r:
        outcome = f"status {r.status}"
except urllib.error.HTTPError as e:
    outcome = f"http {e.code} {e.headers.get('X-Enclave-Egress-Reason')}"
except Exception as e:
    outcome = f"error {type(e).__name__}: {e}"
print(json.dumps({"outcome": outcome}))
"""


# -- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "label"),
    [("main", "main"), ("v1.0", "tagged"), ("feature-commit", "feature")],
)
def test_git_source_checks_out_branch_tag_and_commit(stack, world, ref, label):
    sample = world.repositories["acme/app"]
    if ref == "feature-commit":
        ref = sample.commits["feature"]

    result, session, audit, _, _, _ = run(stack, READ_CHECKOUT, ref=ref)

    seen = succeeded(result, stack)
    assert seen["cwd"] == "/workspace"
    assert seen["version"] == label
    assert ".git" in seen["files"]
    assert "main.py" not in seen["files"], "the code must not sit in the checkout"
    assert ("feature.txt" in seen["files"]) == (label == "feature")
    assert session["source"] == {"git": {"url": repo_url("acme/app"), "ref": ref}}
    actions = [event["action"] for event in audit]
    assert actions.index("credential.issued") < actions.index("credential.revoked")
    # The clone's own way out is reported as the session's.
    assert {"host": GIT_HOST, "allowed": True} in [
        {"host": e["host"], "allowed": e["allowed"]} for e in result["egress"]
    ]


def test_git_source_token_reaches_only_the_clone_step(stack, world):
    minted_before = len(world.github.minted)

    result, session, audit, events, client, responses = run(stack, SCAN)

    seen = succeeded(result, stack)
    new = world.github.minted[minted_before:]
    assert len(new) == 1, "exactly one token for the session"
    token = new[0].token
    assert seen["git_files"] > 0, "the scan must have read the checkout's .git"
    workload_view = zlib.decompress(base64.b64decode(seen["blob"])).decode(
        errors="replace"
    )
    assert token not in workload_view, "the workload can see the git token"
    assert repo_url("acme/app") in workload_view, "the scan missed .git/config"

    # The token is nowhere the control plane keeps or shows anything.
    everywhere = [
        *responses,
        json.dumps(result),
        json.dumps(session),
        json.dumps(audit),
        json.dumps([event.data for event in events]),
        client.get("/sessions").text,
        database_text(stack),
        logs_text(stack),
    ]
    for place in everywhere:
        assert token not in place

    issued = [e["detail"] for e in audit if e["action"] == "credential.issued"]
    revoked = [e["detail"] for e in audit if e["action"] == "credential.revoked"]
    assert len(issued) == len(revoked) == 1
    assert issued[0]["fingerprint"] == revoked[0]["fingerprint"]
    assert issued[0]["repository"] == f"{GIT_HOST}/acme/app"
    assert issued[0]["permissions"]["contents"] == "read"

    # Revoked once the clone was over: the git host refuses it now.
    assert not world.github.token_usable(token)
    assert world.github.authorize_git("acme/app", "x-access-token", token) == 401


def test_git_source_of_another_org_is_refused_and_audited(stack, world):
    minted_before = len(world.github.minted)
    client = stack.client(stack.token("org_b"))

    response = client.post(
        "/sessions",
        json={
            "language": "python",
            "code": "print(1)",
            "source": {"git": {"url": repo_url("acme/app"), "ref": "main"}},
        },
    )
    missing = client.post(
        "/sessions",
        json={
            "language": "python",
            "code": "print(1)",
            "source": {"git": {"url": repo_url("acme/nothing-here")}},
        },
    )

    assert response.status_code == 422, response.text
    assert missing.status_code == 422, missing.text
    # Whether the repository exists does not show.
    assert response.json()["message"] == missing.json()["message"]
    assert response.json()["errors"] == missing.json()["errors"]
    assert len(world.github.minted) == minted_before
    rows = refused_rows(stack, "org_b")
    refused = [
        r["detail"]["repository"] for r in rows if r["action"] == "git_source.refused"
    ]
    assert f"{GIT_HOST}/acme/app" in refused
    assert f"{GIT_HOST}/acme/nothing-here" in refused


@pytest.mark.parametrize(
    ("org", "repository", "ref", "expected"),
    [
        ("org_a", "acme/app", "no-such-branch", "ref no-such-branch is not"),
        ("org_c", "acme/missing", "main", "acme/missing"),
        ("org_c", "frozen/vault", "main", "suspended"),
    ],
    ids=["wrong-ref", "missing-repository", "denied-installation"],
)
def test_git_source_failures_end_the_session_failed(
    stack, world, org, repository, ref, expected
):
    minted_before = len(world.github.minted)

    result, session, audit, _, _, _ = run(
        stack, "print('ran')", org=org, repository=repository, ref=ref
    )

    assert result["phase"] == "failed", result
    assert session["error"], session
    assert expected.lower() in session["error"].lower(), session["error"]
    assert "ran" not in result["stdout"]
    for grant in world.github.minted[minted_before:]:
        assert grant.token not in session["error"]
        assert grant.revoked, "a token of a failed clone must be revoked too"
    actions = [event["action"] for event in audit]
    assert actions.count("credential.issued") == actions.count("credential.revoked")


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        (None, "error URLError: <urlopen error [Errno -"),
        (
            ["other.test"],
            "error URLError: <urlopen error Tunnel connection failed: 403",
        ),
        ([GIT_HOST], "http 401"),
    ],
    ids=["no-egress", "other-host", "git-host-listed"],
)
def test_git_source_workload_reaches_git_host_only_when_allowed(
    stack, world, allow, expected
):
    body = {"egress": {"allow": allow}} if allow else {}

    result, _, _, _, _, _ = run(stack, REACH_GIT_HOST, **body)

    outcome = succeeded(result, stack)["outcome"]
    assert outcome.startswith(expected), outcome
