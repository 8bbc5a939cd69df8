"""`require_scope`, `current_principal` and the development bypass, over HTTP."""

from __future__ import annotations

import logging
import time

import jwt
import pytest

from enclave.auth import (
    SECURITY_SCHEME_NAME,
    ApiKeyIntrospector,
    mint_user_token,
    require_scope,
    warn_if_auth_disabled,
)
from enclave.config import Settings
from enclave.errors import ConfigurationError


def _bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _user_token(settings, scopes="sessions:read sessions:write", **claims) -> str:
    if not claims and scopes is not None:
        return mint_user_token(settings, "user_42", "org_acme", scopes, 300)
    now = int(time.time())
    payload = {"sub": "user_42", "org_id": "org_acme", "scope": scopes}
    payload.update({"iat": now, "exp": now + 300})
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")


def _assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status
    assert response.is_json
    body = response.get_json()
    assert body["code"] == status
    assert isinstance(body["message"], str) and body["message"]
    return body


def test_require_scope_no_header_unauthorized_with_challenge(client):
    response = client.get("/read")

    _assert_error_shape(response, 401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="enclave"'


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer two words",
        "Bearer tab\there",
        "Bearerabc",
        "Bearer " + "a" * 9000,
        "Bearer ab{}",
    ],
    ids=[
        "empty",
        "scheme-only",
        "scheme-space",
        "basic",
        "other-scheme",
        "two-words",
        "tab",
        "no-space",
        "huge",
        "bad-characters",
    ],
)
def test_require_scope_malformed_header_unauthorized(client, console, header):
    response = client.get("/read", headers={"Authorization": header})

    _assert_error_shape(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert console.call_count == 0


def test_require_scope_scheme_is_case_insensitive(client, settings):
    token = _user_token(settings)

    response = client.get("/read", headers={"Authorization": f"bearer {token}"})

    assert response.status_code == 200


def test_require_scope_good_token_gives_principal(client, settings, console):
    response = client.get("/read", headers=_bearer(_user_token(settings)))

    assert response.status_code == 200
    assert response.get_json() == {
        "subject": "user_42",
        "org_id": "org_acme",
        "scopes": ["sessions:read", "sessions:write"],
        "kind": "user",
    }
    assert console.call_count == 0


def test_require_scope_expired_token_unauthorized(client, settings):
    now = int(time.time())
    token = _user_token(settings, iat=now - 600, exp=now - 60)

    response = client.get("/read", headers=_bearer(token))

    body = _assert_error_shape(response, 401)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert token not in response.get_data(as_text=True)
    assert "expired" in body["message"]


def test_require_scope_wrong_secret_unauthorized(client):
    token = jwt.encode(
        {"sub": "u", "org_id": "o", "exp": int(time.time()) + 60},
        "an-entirely-different-secret-of-enough-length",
        algorithm="HS256",
    )

    _assert_error_shape(client.get("/read", headers=_bearer(token)), 401)


def test_require_scope_missing_scope_forbidden(client, settings):
    token = _user_token(settings, scopes="sessions:read")

    response = client.post("/write", headers=_bearer(token))

    body = _assert_error_shape(response, 403)
    assert "sessions:write" in body["message"]
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="sessions:write"' in challenge


def test_require_scope_no_scopes_forbidden(client, settings):
    token = _user_token(settings, scopes=None)

    _assert_error_shape(client.get("/read", headers=_bearer(token)), 403)


def test_require_scope_stacked_needs_every_scope(client, settings):
    read_only = _user_token(settings, scopes="sessions:read")
    both = _user_token(settings)

    assert client.get("/both", headers=_bearer(read_only)).status_code == 403
    assert client.get("/both", headers=_bearer(both)).status_code == 200


def test_require_scope_api_key_active_gives_principal(client, console, api_key):
    console.keys[api_key] = {
        "active": True,
        "sub": "key_9",
        "org_id": "org_beta",
        "scope": "sessions:read",
    }

    response = client.get("/read", headers=_bearer(api_key))

    assert response.status_code == 200
    assert response.get_json() == {
        "subject": "key_9",
        "org_id": "org_beta",
        "scopes": ["sessions:read"],
        "kind": "api_key",
    }
    assert client.post("/write", headers=_bearer(api_key)).status_code == 403


def test_require_scope_api_key_inactive_unauthorized(client, console, api_key):
    console.keys[api_key] = {"active": False}

    response = client.get("/read", headers=_bearer(api_key))

    _assert_error_shape(response, 401)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert api_key not in response.get_data(as_text=True)


def test_require_scope_console_down_unavailable(
    make_app, make_settings, redis_client, closed_port, api_key
):
    settings = make_settings(ENCLAVE_CONSOLE_API_URL=f"http://127.0.0.1:{closed_port}")
    client = make_app(
        settings, ApiKeyIntrospector(settings, redis_client)
    ).test_client()

    response = client.get("/read", headers=_bearer(api_key))

    body = _assert_error_shape(response, 503)
    assert body["type"] == "dependency_unavailable"
    assert api_key not in response.get_data(as_text=True)


def test_require_scope_console_error_unavailable(client, console, api_key):
    console.mode = "error"

    _assert_error_shape(client.get("/read", headers=_bearer(api_key)), 503)


def test_require_scope_slow_console_unavailable(client, console, api_key):
    console.keys[api_key] = {"active": True, "sub": "key_9", "org_id": "org_beta"}
    console.mode = "slow"
    console.delay_s = 2.0

    _assert_error_shape(client.get("/read", headers=_bearer(api_key)), 503)


def test_require_scope_authenticates_once_per_request(
    make_app, make_settings, redis_client, console, api_key
):
    # No cache, so every authentication would reach the console.
    settings = make_settings(ENCLAVE_API_KEY_CACHE_S="0")
    client = make_app(
        settings, ApiKeyIntrospector(settings, redis_client)
    ).test_client()
    console.keys[api_key] = {
        "active": True,
        "sub": "key_9",
        "org_id": "org_beta",
        "scope": "sessions:read sessions:write",
    }

    assert client.get("/both", headers=_bearer(api_key)).status_code == 200
    assert console.call_count == 1
    assert client.get("/both", headers=_bearer(api_key)).status_code == 200
    assert console.call_count == 2


def test_require_scope_without_introspector_refuses_api_keys(
    make_app, settings, console, api_key
):
    client = make_app(settings, None).test_client()

    _assert_error_shape(client.get("/read", headers=_bearer(api_key)), 401)
    assert (
        client.get("/read", headers=_bearer(_user_token(settings))).status_code == 200
    )
    assert console.call_count == 0


def test_current_principal_authenticates_unguarded_view(client, settings):
    assert client.get("/whoami").status_code == 401

    response = client.get("/whoami", headers=_bearer(_user_token(settings)))

    assert response.get_json()["org_id"] == "org_acme"


def test_require_scope_auth_disabled_gives_development_principal(
    make_app, make_settings, redis_client, console, caplog
):
    settings = make_settings(ENCLAVE_AUTH_DISABLED="1")
    client = make_app(
        settings, ApiKeyIntrospector(settings, redis_client)
    ).test_client()
    caplog.set_level(logging.WARNING, logger="enclave.auth")

    first = client.post("/write")
    second = client.get("/read", headers=_bearer("whatever-was-sent"))

    assert first.status_code == second.status_code == 200
    assert first.get_json() == {
        "subject": "user_dev",
        "org_id": "org_dev",
        "scopes": ["sessions:read", "sessions:write"],
        "kind": "development",
    }
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "authentication is disabled" in r.message
    ]
    assert len(warnings) == 2
    assert "/write" in warnings[0].getMessage()
    assert console.call_count == 0


def test_settings_load_auth_enabled_by_default(jwt_secret):
    settings = Settings.load(
        {"ENCLAVE_ENV": "development", "ENCLAVE_JWT_SECRET": jwt_secret}
    )

    assert settings.auth_disabled is False


def test_warn_if_auth_disabled_logs_warning(make_settings, caplog):
    caplog.set_level(logging.DEBUG, logger="enclave.auth")

    assert warn_if_auth_disabled(make_settings(ENCLAVE_AUTH_DISABLED="1")) is True

    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "ENCLAVE_AUTH_DISABLED" in caplog.records[0].getMessage()


def test_warn_if_auth_disabled_silent_when_enabled(settings, caplog):
    caplog.set_level(logging.DEBUG, logger="enclave.auth")

    assert warn_if_auth_disabled(settings) is False

    assert caplog.records == []


def test_settings_load_refuses_auth_disabled_in_production(jwt_secret):
    environ = {
        "ENCLAVE_ENV": "production",
        "ENCLAVE_AUTH_DISABLED": "1",
        "ENCLAVE_JWT_SECRET": jwt_secret,
        "ENCLAVE_DATABASE_URL": "postgresql://enclave@db/enclave",
        "ENCLAVE_REDIS_URL": "redis://redis:6379/0",
    }

    with pytest.raises(ConfigurationError, match="ENCLAVE_AUTH_DISABLED"):
        Settings.load(environ)

    environ["ENCLAVE_AUTH_DISABLED"] = "0"
    assert Settings.load(environ).auth_disabled is False


def test_require_scope_unknown_scope_refused_at_decoration():
    with pytest.raises(ValueError, match="unknown scope"):
        require_scope("sessions:admin")


def test_require_scope_marks_view_for_openapi():
    def view():
        """List sessions."""

    view._apidoc = {"manual_doc": {"description": "kept"}, "arguments": {"x": 1}}

    guarded = require_scope("sessions:read")(view)

    assert guarded._apidoc["manual_doc"] == {
        "description": "kept",
        "security": [{SECURITY_SCHEME_NAME: []}],
    }
    assert guarded._apidoc["arguments"] == {"x": 1}
    assert "security" not in view._apidoc["manual_doc"]
    assert guarded.__doc__ == "List sessions."


def test_require_scope_logs_never_hold_credentials(
    client, settings, console, api_key, caplog
):
    caplog.set_level(logging.DEBUG)
    console.keys[api_key] = {
        "active": True,
        "sub": "key_9",
        "org_id": "org_beta",
        "scope": "sessions:read",
    }
    good = _user_token(settings, scopes="sessions:read")
    expired = _user_token(settings, exp=int(time.time()) - 60)

    client.get("/read", headers=_bearer(good))
    client.post("/write", headers=_bearer(good))
    client.get("/read", headers=_bearer(expired))
    client.get("/read", headers=_bearer(api_key))
    client.post("/write", headers=_bearer(api_key))
    client.get("/read", headers=_bearer(api_key + "nope"))
    client.get("/read", headers={"Authorization": f"Basic {api_key}"})

    assert caplog.records
    for secret in (api_key, good, expired, settings.jwt_secret, console.token):
        assert secret not in caplog.text
    assert good.split(".")[2] not in caplog.text
