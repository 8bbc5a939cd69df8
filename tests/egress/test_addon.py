"""The egress addon inside a real mitmproxy, driven straight from the test.

The proxy runs in a thread of the test process (`build_master`, the same
master the process runs) against real Redis, a real SQLite database and the
upstreams; the test speaks to its port as a sandbox's relay would, with the
credentials of policies it stored itself. This reaches what the end-to-end
tests cannot: the report being stored before the answer, the state the addon
keeps per connection, and what happens when Redis is gone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from enclave import schema
from enclave.config import Settings
from enclave.db import configure_database, connection
from enclave.egress.addon import EgressAddon
from enclave.egress.authority import prepare_authority
from enclave.egress.bindings import BindingConfig
from enclave.egress.policy import Policy, new_token, store_policy, token_digest
from enclave.egress.proxy import build_master
from enclave.egress.resolver import Resolver
from enclave.events.log import stored_events
from enclave.models import Session
from tests.egress.conftest import PRIVATE_NAMES, UPSTREAM_NAMES
from tests.servers import free_port


class ProxyThread:
    """The proxy's master on a loop of its own, in a thread of the test."""

    def __init__(self, settings, addon, port: int) -> None:
        self.settings = settings
        self.addon = addon
        self.port = port
        self.master = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the proxy did not listen")

    def stop(self) -> None:
        if self.master is not None:
            self.master.shutdown()
        self.thread.join(10)

    def _run(self) -> None:
        async def main():
            confdir = str(prepare_authority(self.settings))
            self.master = build_master(
                self.settings, ("127.0.0.1", self.port), confdir, self.addon
            )
            await self.master.run()

        asyncio.run(main())


@pytest.fixture
def settings(tmp_path, test_authority, upstreams) -> Settings:
    overrides = {name: upstreams.address for name in UPSTREAM_NAMES}
    overrides.update(PRIVATE_NAMES)
    return Settings.load(
        {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_STATE_DIR": str(tmp_path / "state"),
            "ENCLAVE_EGRESS_CA_DIR": str(tmp_path / "ca"),
            "ENCLAVE_EGRESS_EXTRA_CA_FILE": str(test_authority.ca_file),
            "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": json.dumps(overrides),
        }
    )


@pytest.fixture
def database(sqlite_url):
    configure_database(sqlite_url)
    schema.migrate()


def start_proxy(settings, client):
    addon = EgressAddon(
        client=client,
        bindings=BindingConfig(),
        resolver=Resolver(json.loads(settings.egress_resolve_overrides)),
        executor=ThreadPoolExecutor(max_workers=4),
    )
    proxy = ProxyThread(settings, addon, free_port())
    proxy.start()
    return proxy


@pytest.fixture
def proxy(settings, redis_client, database):
    running = start_proxy(settings, redis_client)
    yield running
    running.stop()


def running_session(redis_client, session_id, allow) -> str:
    with connection():
        Session.create(
            id=session_id,
            org_id="org_addon",
            created_by="user_1",
            language="python",
            code="pass",
            phase="running",
            limits={},
            egress={"allow": list(allow)},
            service_bindings=[],
            metadata={},
            backend="local",
        )
    token = new_token()
    store_policy(
        redis_client,
        Policy(session_id, "org_addon", tuple(allow), (), token_digest(token)),
        ttl_s=60,
    )
    return token


def tunnel(port, target, session_id, token):
    """CONNECT through the proxy: (socket, status, reason header)."""
    credentials = base64.b64encode(f"{session_id}:{token}".encode()).decode()
    s = socket.create_connection(("127.0.0.1", port), 10)
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
    lines = head.decode("latin-1").split("\r\n")
    reason = next(
        (
            line.split(":", 1)[1].strip()
            for line in lines
            if line.lower().startswith("x-enclave-egress-reason:")
        ),
        None,
    )
    return s, int(lines[0].split()[1]), reason


def egress_events(session_id):
    with connection():
        return [e.data for e in stored_events(session_id, kinds=("egress",))]


def test_addon_reports_before_it_answers(proxy, redis_client):
    token = running_session(redis_client, "ses_addon1", ["api.test"])

    s, status, reason = tunnel(proxy.port, "other.test:443", "ses_addon1", token)
    # Read right after the answer: the event must already be stored.
    events = egress_events("ses_addon1")
    s.close()

    assert (status, reason) == (403, "host_not_allowed")
    assert [(e["host"], e["allowed"], e["reason"]) for e in events] == [
        ("other.test", False, "host_not_allowed")
    ]


def test_addon_passes_allowed_tls_through_untouched(
    proxy, redis_client, test_authority
):
    token = running_session(redis_client, "ses_addon2", ["api.test"])

    s, status, _ = tunnel(proxy.port, "api.test:443", "ses_addon2", token)
    context = ssl.create_default_context(cafile=str(test_authority.ca_file))
    with context.wrap_socket(s, server_hostname="api.test") as tls:
        issuer = dict(x[0] for x in tls.getpeercert()["issuer"])["commonName"]
        tls.sendall(
            b"GET /hello HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk

    assert status == 200
    assert issuer == "egress test CA"
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(
        b"hello api.test https\n"
    )
    assert egress_events("ses_addon2")[0]["allowed"] is True


def test_addon_refuses_unknown_sessions_and_wrong_tokens(proxy, redis_client):
    token = running_session(redis_client, "ses_addon3", ["api.test"])

    answers = [
        tunnel(proxy.port, "api.test:443", "ses_addon3", token + "x"),
        tunnel(proxy.port, "api.test:443", "ses_missing", token),
        tunnel(proxy.port, "api.test:443", "not a session id", token),
    ]
    for s, _, _ in answers:
        s.close()

    assert [status for _, status, _ in answers] == [407, 407, 407]
    # Nobody was authenticated, so nothing is reported to the session.
    assert egress_events("ses_addon3") == []


def test_addon_forgets_connections_once_they_close(proxy, redis_client):
    token = running_session(redis_client, "ses_addon4", ["api.test"])

    for _ in range(30):
        s, status, _ = tunnel(proxy.port, "api.test:80", "ses_addon4", token)
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        while s.recv(4096):
            pass
        s.close()
        assert status == 200

    deadline = time.monotonic() + 5
    while proxy.addon._clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.addon._clients == {}
    assert len(egress_events("ses_addon4")) == 30


def test_addon_without_redis_refuses_with_503(settings, database):
    unused = free_port()
    dead = redis.Redis(port=unused, socket_connect_timeout=0.5)
    running = start_proxy(settings, dead)
    try:
        s, status, reason = tunnel(running.port, "api.test:443", "ses_x", "token")
        s.close()
    finally:
        running.stop()

    assert (status, reason) == (503, "unavailable")
