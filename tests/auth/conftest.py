"""Fixtures for the auth tests: settings, a stand-in console API and a Flask app.

The console stand-in is a real HTTP server on 127.0.0.1 that speaks the
introspection endpoint, so the introspector's requests, timeouts and error
handling are exercised over a socket. Redis is the real one from
`tests/conftest.py` (`redis_url`, `redis_client`).
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask, jsonify
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from enclave.auth import (
    ApiKeyIntrospector,
    current_principal,
    require_scope,
)
from enclave.auth.apikeys import INTROSPECT_PATH
from enclave.config import Settings
from enclave.errors import EnclaveError


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class ConsoleStub:
    """The console's introspection endpoint, with switchable misbehaviour.

    `mode` is "normal" (answer from `keys`, inactive for anything else),
    "error" (500), "slow" (sleep `delay_s`, then answer normally) or "raw"
    (answer `raw_body` with `raw_status` and `raw_headers`). Every call is
    recorded in `calls`.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.keys: dict[str, dict[str, Any]] = {}
        self.mode = "normal"
        self.delay_s = 0.0
        self.raw_body = b""
        self.raw_status = 200
        self.raw_headers: dict[str, str] = {}
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = make_server(
            "127.0.0.1",
            0,
            self._app,
            threaded=True,
            request_handler=_QuietHandler,
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # A short poll keeps `stop()`, which waits for the loop, quick.
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )

    @property
    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @Request.application
    def _app(self, request: Request) -> Response:
        if request.method != "POST" or request.path != INTROSPECT_PATH:
            return Response(status=404)
        body = request.get_json(silent=True)
        with self._lock:
            self.calls.append(
                {
                    "authorization": request.headers.get("Authorization"),
                    "content_type": request.headers.get("Content-Type"),
                    "body": body,
                }
            )
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json({"error": "invalid_client"}, status=401)
        if self.mode == "error":
            return _json({"error": "server_error"}, status=500)
        if self.mode == "raw":
            return Response(
                self.raw_body,
                status=self.raw_status,
                headers=self.raw_headers,
                mimetype="application/json",
            )
        if self.mode == "slow":
            time.sleep(self.delay_s)
        if not isinstance(body, dict) or not isinstance(body.get("token"), str):
            return _json({"error": "invalid_request"}, status=400)

        return _json(self.keys.get(body["token"], {"active": False}))


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


@pytest.fixture
def console() -> Iterator[ConsoleStub]:
    stub = ConsoleStub(token=secrets.token_urlsafe(24))
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound but never `listen()`ed, so it refuses."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def jwt_secret() -> str:
    return secrets.token_urlsafe(48)


@pytest.fixture
def api_key() -> str:
    return "ek_test_" + secrets.token_urlsafe(32)


@pytest.fixture
def make_settings(
    jwt_secret: str,
    redis_url: str,
    console: ConsoleStub,
) -> Callable[..., Settings]:
    """Settings as `Settings.load` builds them from ENCLAVE_* variables."""

    def make(**overrides: str) -> Settings:
        environ = {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_JWT_SECRET": jwt_secret,
            "ENCLAVE_REDIS_URL": redis_url,
            "ENCLAVE_CONSOLE_API_URL": console.url,
            "ENCLAVE_CONSOLE_API_TOKEN": console.token,
            "ENCLAVE_CONSOLE_API_TIMEOUT_S": "0.5",
        }
        environ.update(overrides)
        return Settings.load(environ)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def introspector(settings: Settings, redis_client) -> ApiKeyIntrospector:
    return ApiKeyIntrospector(settings, redis_client)


@pytest.fixture
def make_app() -> Callable[[Settings, ApiKeyIntrospector | None], Flask]:
    """A Flask app with guarded views, wired the way the app factory wires it."""

    def make(settings: Settings, introspector: ApiKeyIntrospector | None) -> Flask:
        app = Flask("auth-tests")
        app.extensions["enclave"] = SimpleNamespace(
            settings=settings,
            introspector=introspector,
        )

        @app.errorhandler(EnclaveError)
        def handle(err: EnclaveError):
            return jsonify(err.to_dict()), err.status, err.headers

        @app.get("/read")
        @require_scope("sessions:read")
        def read():
            return jsonify(_describe(current_principal()))

        @app.post("/write")
        @require_scope("sessions:write")
        def write():
            return jsonify(_describe(current_principal()))

        @app.get("/both")
        @require_scope("sessions:read")
        @require_scope("sessions:write")
        def both():
            return jsonify(_describe(current_principal()))

        @app.get("/whoami")
        def whoami():
            return jsonify(_describe(current_principal()))

        return app

    return make


@pytest.fixture
def app(make_app, settings: Settings, introspector: ApiKeyIntrospector) -> Flask:
    return make_app(settings, introspector)


@pytest.fixture
def client(app: Flask):
    return app.test_client()


def _describe(principal) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "org_id": principal.org_id,
        "scopes": sorted(principal.scopes),
        "kind": principal.kind,
    }
