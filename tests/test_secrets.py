"""No JWT secret, token or API key in any response, event, stored row or log line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import peewee
import pytest
import requests

from tests.servers import free_port
from tests.test_service import wait_for_phase

API_KEY = "ek_live_" + "Q7x" * 12


class Console(BaseHTTPRequestHandler):
    """A stand-in for the console API's RFC 7662-style introspection endpoint."""

    def do_POST(self):  # noqa: N802 - the http.server interface
        length = int(self.headers.get("Content-Length", 0))
        token = json.loads(self.rfile.read(length))["token"]
        answer = (
            {
                "active": True,
                "sub": "key_ci",
                "org_id": "org_keys",
                "scope": "sessions:read sessions:write",
            }
            if token == API_KEY and self.path == "/internal/api-keys/introspect"
            else {"active": False}
        )
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def console():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Console)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_no_secret_leaks_anywhere(stack_factory, console):
    stack = stack_factory(env={"ENCLAVE_CONSOLE_API_URL": console})
    token = stack.token("org_keys")
    seen: list[str] = []

    def call(method, path, credential, **kwargs):
        response = requests.request(
            method,
            stack.base_url + path,
            headers={
                "Authorization": f"Bearer {credential}",
                **kwargs.pop("headers", {}),
            },
            timeout=30,
            **kwargs,
        )
        seen.append(response.text)
        seen.append(json.dumps(dict(response.headers)))
        return response

    body = {"language": "python", "code": "#sim stdout fine", "metadata": {"team": "a"}}
    by_key = call("POST", "/sessions", API_KEY, json=body).json()
    by_jwt = call("POST", "/sessions", token, json=body).json()
    assert by_key["created_by"] == "key_ci" and by_key["org_id"] == "org_keys"
    for session in (by_key, by_jwt):
        client = stack.client(token)
        wait_for_phase(client, session["id"], {"succeeded"})
        for path in ("", "/result", "/audit", "/stream"):
            call("GET", f"/sessions/{session['id']}{path}", API_KEY)
        call("DELETE", f"/sessions/{session['id']}", token)
    call("GET", "/sessions", API_KEY)
    call("GET", "/sessions/ses_nope", "not-a-valid-key")
    call("GET", "/sessions", token + "tampered")
    call(
        "POST",
        "/sessions",
        API_KEY,
        data="{bad json",
        headers={"Content-Type": "application/json"},
    )

    db = peewee.PostgresqlDatabase(None)
    from urllib.parse import urlparse

    parsed = urlparse(stack.database_url)
    db.init(
        parsed.path.lstrip("/"),
        host=parsed.hostname,
        port=parsed.port,
        user=parsed.username,
    )
    rows = []
    for table in ("session", "session_event", "audit_event", "idempotency_key"):
        rows.extend(
            str(row) for row in db.execute_sql(f"SELECT * FROM {table}").fetchall()
        )
    db.close()

    import redis

    client = redis.Redis.from_url(stack.redis_url)
    stored = [str(key) + str(client.dump(key)) for key in client.keys("*")]

    haystacks = {
        "responses": seen,
        "database": rows,
        "redis": stored,
        "logs": [stack.logs()],
    }
    for secret in (stack.jwt_secret, API_KEY, token):
        for where, texts in haystacks.items():
            assert not any(secret in text for text in texts), (
                f"a secret was found in {where}"
            )
    assert rows and stored and seen
