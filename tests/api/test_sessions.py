"""The session routes' contract: validation, tenancy, idempotency, errors."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import bearer, create

ROUTES = [
    ("GET", "/sessions/{id}"),
    ("GET", "/sessions/{id}/result"),
    ("GET", "/sessions/{id}/audit"),
    ("GET", "/sessions/{id}/stream"),
    ("DELETE", "/sessions/{id}"),
]


def assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == status
    assert isinstance(body["status"], str) and body["status"]
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def test_create_session_returns_queued_session_with_location(client):
    response = create(client)

    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"/sessions/{body['id']}"
    assert body["phase"] == "queued"
    assert body["org_id"] == "org_a"
    assert body["created_by"] == "user_1"
    assert body["limits"]["timeout_s"] == 30
    assert body["limits"]["cpu_s"] == 30
    assert body["backend"] == "simulator"
    assert body["created_at"].endswith("Z")
    assert "code" not in body and "stdin" not in body


def test_create_session_cpu_defaults_to_requested_timeout(client):
    response = create(
        client, body={"language": "node", "code": "1", "limits": {"timeout_s": 7}}
    )

    assert response.status_code == 201
    assert response.get_json()["limits"]["cpu_s"] == 7


@pytest.mark.parametrize("method, route", ROUTES)
def test_routes_answer_404_for_another_orgs_session(client, method, route):
    session_id = create(client, "org_a").get_json()["id"]

    response = client.open(
        route.format(id=session_id), method=method, headers=bearer("org_b")
    )

    body = assert_error_shape(response, 404)
    assert session_id not in json.dumps(body)


@pytest.mark.parametrize("method, route", ROUTES)
def test_routes_answer_404_for_unknown_session(client, method, route):
    response = client.open(
        route.format(id="ses_missing"), method=method, headers=bearer("org_a")
    )

    assert_error_shape(response, 404)


def test_list_sessions_shows_only_the_callers_org_newest_first(client):
    mine = [create(client, "org_a").get_json()["id"] for _ in range(3)]
    create(client, "org_b")

    listed = client.get("/sessions", headers=bearer("org_a")).get_json()

    assert [s["id"] for s in listed["sessions"]] == list(reversed(mine))
    assert {s["org_id"] for s in listed["sessions"]} == {"org_a"}
    assert listed["next_cursor"] is None


def test_list_sessions_pages_with_cursor(client):
    made = [create(client, "org_a").get_json()["id"] for _ in range(5)]

    first = client.get("/sessions?limit=2", headers=bearer("org_a")).get_json()
    second = client.get(
        f"/sessions?limit=2&cursor={first['next_cursor']}", headers=bearer("org_a")
    ).get_json()
    third = client.get(
        f"/sessions?limit=2&cursor={second['next_cursor']}", headers=bearer("org_a")
    ).get_json()

    seen = [s["id"] for page in (first, second, third) for s in page["sessions"]]
    assert seen == list(reversed(made))
    assert third["next_cursor"] is None


def test_list_sessions_filters_by_phase(client):
    create(client, "org_a")

    queued = client.get("/sessions?phase=queued", headers=bearer("org_a")).get_json()
    running = client.get("/sessions?phase=running", headers=bearer("org_a")).get_json()

    assert len(queued["sessions"]) == 1
    assert running["sessions"] == []


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=x", "phase=bogus", "cursor=%21%21"],
)
def test_list_sessions_rejects_bad_query(client, query):
    response = client.get(f"/sessions?{query}", headers=bearer("org_a"))

    assert_error_shape(response, 422)


def test_create_session_rejects_malformed_json(client):
    response = client.post(
        "/sessions",
        data='{"language": "python",',
        headers={**bearer("org_a"), "Content-Type": "application/json"},
    )

    assert_error_shape(response, 400)


@pytest.mark.parametrize("body", ["[]", '"text"', "42", "null"])
def test_create_session_rejects_non_object_body(client, body):
    response = client.post(
        "/sessions",
        data=body,
        headers={**bearer("org_a"), "Content-Type": "application/json"},
    )

    assert_error_shape(response, 400)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"language": "ruby", "code": "1"}, "language"),
        ({"language": "python"}, "code"),
        ({"code": "1"}, "language"),
        ({"language": "python", "code": "1", "colour": "red"}, "colour"),
        ({"language": "python", "code": "1", "limits": {"timeout": 5}}, "limits"),
        (
            {"language": "python", "code": "1", "limits": {"memory_mb": "lots"}},
            "limits",
        ),
        (
            {"language": "python", "code": "1", "limits": {"timeout_s": 999999}},
            "limits",
        ),
        ({"language": "python", "code": "1", "limits": {"pids": 100000}}, "limits"),
        (
            {"language": "python", "code": "1", "egress": {"allow": ["http://x"]}},
            "egress",
        ),
        (
            {"language": "python", "code": "1", "service_bindings": ["nope"]},
            "service_bindings",
        ),
        ({"language": "python", "code": "1", "metadata": {"k": 1}}, "metadata"),
        ({"language": "python", "code": 5}, "code"),
    ],
)
def test_create_session_rejects_invalid_fields(client, body, field):
    response = create(client, body=body)

    body = assert_error_shape(response, 422)
    assert field in body["errors"]["json"]


def test_create_session_limit_over_maximum_names_the_maximum(client):
    response = create(
        client,
        body={"language": "python", "code": "1", "limits": {"memory_mb": 999999}},
    )

    body = assert_error_shape(response, 422)
    assert "4096" in body["errors"]["json"]["limits"]["memory_mb"][0]


def test_create_session_rejects_code_over_size_limit(client, app):
    limit = app.extensions["enclave"].settings.max_code_bytes

    response = create(client, body={"language": "python", "code": "x" * (limit + 1)})

    body = assert_error_shape(response, 422)
    assert "code" in body["errors"]["json"]


def test_create_session_rejects_body_over_size_limit(client, app):
    limit = app.extensions["enclave"].settings.max_body_bytes

    response = create(client, body={"language": "python", "code": "x" * limit})

    assert_error_shape(response, 413)


def test_create_session_rejects_non_json_content_type(client):
    response = client.post(
        "/sessions",
        data="language=python",
        headers={**bearer("org_a"), "Content-Type": "text/plain"},
    )

    assert_error_shape(response, 400)


def test_idempotency_key_same_body_returns_same_session(client):
    first = create(client, **{"Idempotency-Key": "k-1"})
    again = create(client, **{"Idempotency-Key": "k-1"})

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    listed = client.get("/sessions", headers=bearer("org_a")).get_json()
    assert len(listed["sessions"]) == 1


def test_idempotency_key_other_body_conflicts(client):
    create(client, **{"Idempotency-Key": "k-2"})

    response = create(
        client, body={"language": "node", "code": "2"}, **{"Idempotency-Key": "k-2"}
    )

    assert_error_shape(response, 409)


def test_idempotency_key_is_scoped_to_the_org(client):
    a = create(client, "org_a", **{"Idempotency-Key": "shared"})
    b = create(client, "org_b", **{"Idempotency-Key": "shared"})

    assert a.status_code == b.status_code == 201
    assert a.get_json()["id"] != b.get_json()["id"]


def test_result_conflicts_while_session_is_unfinished(client):
    session_id = create(client).get_json()["id"]

    response = client.get(f"/sessions/{session_id}/result", headers=bearer("org_a"))

    assert_error_shape(response, 409)


def test_delete_queued_session_kills_it_with_teardown_twice_the_same(client):
    session_id = create(client).get_json()["id"]

    first = client.delete(f"/sessions/{session_id}", headers=bearer("org_a"))
    second = client.delete(f"/sessions/{session_id}", headers=bearer("org_a"))

    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json()
    body = first.get_json()
    assert body["phase"] == "killed"
    assert body["kill_reason"] == "teardown"
    assert body["torn_down_at"] is not None
    result = client.get(
        f"/sessions/{session_id}/result", headers=bearer("org_a")
    ).get_json()
    assert result["phase"] == "killed" and result["kill_reason"] == "teardown"
    actions = [
        e["action"]
        for e in client.get(
            f"/sessions/{session_id}/audit", headers=bearer("org_a")
        ).get_json()["events"]
    ]
    assert actions == ["session.created", "session.killed", "session.torn_down"]


def test_active_session_quota_answers_429_with_retry_after(
    fresh_postgres_url, redis_url, redis_client
):
    from enclave import schema
    from enclave.app import create_app
    from enclave.db import configure_database
    from tests.api.conftest import make_settings

    settings = make_settings(
        fresh_postgres_url, redis_url, ENCLAVE_MAX_ACTIVE_SESSIONS_PER_ORG="2"
    )
    configure_database(settings.database_url)
    schema.migrate()
    client = create_app(settings).test_client()
    create(client, "org_a")
    create(client, "org_a")

    refused = create(client, "org_a")
    other_org = create(client, "org_b")

    body = assert_error_shape(refused, 429)
    assert int(refused.headers["Retry-After"]) > 0
    assert body["type"] == "quota_exceeded"
    assert other_org.status_code == 201


def test_unknown_route_and_method_answer_json(client):
    assert_error_shape(client.get("/nope"), 404)
    assert_error_shape(client.put("/sessions", headers=bearer("org_a")), 405)


def test_openapi_document_lists_every_route(client):
    spec = client.get("/openapi.json").get_json()

    paths = spec["paths"]
    assert set(paths) >= {
        "/sessions",
        "/sessions/{session_id}",
        "/sessions/{session_id}/result",
        "/sessions/{session_id}/audit",
        "/sessions/{session_id}/stream",
        "/healthz",
    }
    assert (
        paths["/sessions"]["post"]["summary"] == "Create a session and queue it to run"
    )
    assert "bearerAuth" in spec["components"]["securitySchemes"]


def test_docs_page_loads_its_assets_from_this_service(client):
    page = client.get("/docs").get_data(as_text=True)

    assert "/docs/static/swagger-ui-bundle.js" in page
    assert "https://" not in page.split("<body")[0] or "cdn" not in page
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200


def test_unexpected_error_answers_500_json_without_traceback(app):
    def explode():
        raise RuntimeError("internal detail that must not leak")

    app.add_url_rule("/explode", view_func=explode)

    response = app.test_client().get("/explode")

    body = assert_error_shape(response, 500)
    assert "internal detail" not in response.get_data(as_text=True)
    assert body["type"] == "internal_error"


def test_every_response_carries_a_request_id(client):
    generated = client.get("/healthz").headers["X-Request-ID"]
    kept = client.get("/healthz", headers={"X-Request-ID": "trace-42"}).headers[
        "X-Request-ID"
    ]
    replaced = client.get("/nope", headers={"X-Request-ID": "bad id; DROP"}).headers[
        "X-Request-ID"
    ]

    assert len(generated) == 16
    assert kept == "trace-42"
    assert replaced != "bad id; DROP" and len(replaced) == 16
