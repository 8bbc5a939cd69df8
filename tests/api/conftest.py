"""An app on real PostgreSQL and Redis, driven through Flask's test client.

For what needs no worker and no SSE: validation, auth, tenancy, idempotency,
errors. Flows that run sessions go through `stack_factory` instead.
"""

from __future__ import annotations

import time

import jwt
import pytest

from enclave import schema
from enclave.app import create_app
from enclave.config import Settings
from enclave.db import configure_database

JWT_SECRET = "test-secret-" + "x" * 40


def make_settings(database_url: str, redis_url: str, **overrides: str) -> Settings:
    environ = {
        "ENCLAVE_ENV": "test",
        "ENCLAVE_DATABASE_URL": database_url,
        "ENCLAVE_REDIS_URL": redis_url,
        "ENCLAVE_JWT_SECRET": JWT_SECRET,
        "ENCLAVE_BACKEND": "simulator",
        "ENCLAVE_QUEUE_NAME": "enclave-api-tests",
    }
    environ.update(overrides)
    return Settings.load(environ)


@pytest.fixture
def settings(fresh_postgres_url, redis_url, redis_client) -> Settings:
    return make_settings(fresh_postgres_url, redis_url)


@pytest.fixture
def app(settings):
    configure_database(settings.database_url)
    schema.migrate()
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(org_id: str, scopes: str = "sessions:read sessions:write", **claims) -> dict:
    payload = {
        "sub": "user_1",
        "org_id": org_id,
        "scope": scopes,
        "exp": int(time.time()) + 300,
    }
    payload.update(claims)
    return {
        "Authorization": "Bearer " + jwt.encode(payload, JWT_SECRET, algorithm="HS256")
    }


def create(client, org_id: str = "org_a", body: dict | None = None, **headers):
    body = (
        body if body is not None else {"language": "python", "code": "#sim stdout hi"}
    )
    return client.post("/sessions", json=body, headers={**bearer(org_id), **headers})
