"""The application factory.

`create_app()` reads the settings (refusing to start on a bad deployment),
binds the database, builds the shared clients and the orchestrator, and
registers the blueprints and the one error handler. Everything a request
needs lives on `app.extensions["enclave"]`.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass

import redis
import swagger_ui_bundle
from flask import Flask, g, request, send_from_directory
from flask_smorest import Api

from enclave.api import health, sessions
from enclave.api.errors import register_error_handlers
from enclave.auth import (
    SECURITY_SCHEME,
    SECURITY_SCHEME_NAME,
    ApiKeyIntrospector,
    warn_if_auth_disabled,
)
from enclave.backends import SessionBackend, create_backend
from enclave.config import Settings
from enclave.connections import redis_client, session_queue
from enclave.db import configure_database, database
from enclave.errors import BadRequest
from enclave.events.relay import EventRelay
from enclave.greenio import make_psycopg2_cooperative
from enclave.logs import configure_logging
from enclave.sessions.orchestrator import Orchestrator

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
BODY_METHODS = ("POST", "PUT", "PATCH")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class Extension:
    settings: Settings
    redis: redis.Redis
    backend: SessionBackend
    orchestrator: Orchestrator
    introspector: ApiKeyIntrospector | None
    relay: EventRelay


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.load()
    configure_logging(settings)
    warn_if_auth_disabled(settings)
    make_psycopg2_cooperative()
    configure_database(settings.database_url)

    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="Enclave",
        API_VERSION=API_VERSION,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/docs/static/",
        API_SPEC_OPTIONS={
            "info": {
                "description": (
                    "Runs untrusted Python and Node code in sandboxes. Errors are JSON "
                    "`{code, status, message, type, errors?}`."
                )
            },
            "security": [{SECURITY_SCHEME_NAME: []}],
        },
    )

    client = redis_client(settings)
    backend = create_backend(settings)
    introspector = (
        ApiKeyIntrospector(settings, client) if settings.console_api_url else None
    )
    app.extensions["enclave"] = Extension(
        settings=settings,
        redis=client,
        backend=backend,
        orchestrator=Orchestrator(
            settings, client, session_queue(settings, client), backend
        ),
        introspector=introspector,
        relay=EventRelay(client),
    )

    api = Api(app)
    api.spec.components.security_scheme(SECURITY_SCHEME_NAME, SECURITY_SCHEME)
    api.register_blueprint(sessions.blp)
    api.register_blueprint(health.blp)
    register_error_handlers(app)
    _register_request_hooks(app)

    @app.route("/docs/static/<path:filename>")
    def docs_static(filename):
        # The docs page's scripts are served from here, so it works offline.
        return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename)

    logger.info("web app ready backend=%s env=%s", backend.name, settings.env)
    return app


def _register_request_hooks(app: Flask) -> None:
    @app.before_request
    def assign_request_id():
        # A caller's id is kept when it is plain enough to log safely.
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else secrets.token_hex(8)

    @app.after_request
    def return_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    @app.before_request
    def require_json_object():
        if request.method not in BODY_METHODS or not request.content_length:
            return
        if not request.is_json:
            raise BadRequest(
                "Send the body as JSON with Content-Type: application/json."
            )
        body = request.get_json(silent=True)
        if body is None:
            raise BadRequest("The body is not valid JSON.")
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")

    # Peewee connects on the first query of a request; close what it opened.
    @app.teardown_request
    def close_database(exc):
        if not database.is_closed():
            database.close()
