"""`GET /healthz`: 200 when every dependency answers, 503 with the same shape when not."""

from __future__ import annotations

from enclave import schema
from enclave.app import create_app
from enclave.db import configure_database
from tests.api.conftest import make_settings
from tests.servers import free_port


def test_healthz_ok_without_credentials(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] and body["redis"]["ok"] and body["backend"]["ok"]


def test_healthz_answers_503_when_redis_is_down(fresh_postgres_url):
    settings = make_settings(fresh_postgres_url, f"redis://127.0.0.1:{free_port()}/0")
    configure_database(settings.database_url)
    schema.migrate()
    client = create_app(settings).test_client()

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["redis"]["ok"] is False
    assert body["database"]["ok"] is True


def test_healthz_answers_503_when_the_database_is_down(redis_url, redis_client):
    settings = make_settings(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", redis_url
    )
    client = create_app(settings).test_client()

    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.get_json()["database"]["ok"] is False


def test_api_answers_503_when_the_database_is_down(redis_url, redis_client):
    from tests.api.conftest import bearer

    settings = make_settings(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", redis_url
    )
    client = create_app(settings).test_client()

    response = client.get("/sessions", headers=bearer("org_a"))

    assert response.status_code == 503
    assert response.get_json()["code"] == 503
