"""API key introspection against a real HTTP console stand-in and real Redis."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest
import redis

from enclave import connections
from enclave.auth import ApiKeyIntrospector
from enclave.auth.apikeys import CACHE_PREFIX, INACTIVE_CACHE_S
from enclave.errors import DependencyUnavailable, Unauthorized


def _active(**overrides):
    answer = {
        "active": True,
        "sub": "key_123",
        "org_id": "org_acme",
        "scope": "sessions:read sessions:write",
    }
    answer.update(overrides)
    return answer


def _dead_redis(settings, port: int) -> redis.Redis:
    """The service's own Redis client, pointed at a port where nothing answers."""
    url = f"redis://127.0.0.1:{port}/0"
    return connections.redis_client(settings.replace(redis_url=url))


def _all_redis_bytes(client: redis.Redis) -> list[bytes]:
    """Every key and every value in the database, whatever the value's type."""
    found = []
    for key in client.scan_iter(count=1000):
        found.append(key)
        kind = client.type(key)
        if kind == b"string":
            found.append(client.get(key))
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                found.extend([field, value])
        elif kind in (b"list",):
            found.extend(client.lrange(key, 0, -1))
        elif kind in (b"set",):
            found.extend(client.smembers(key))
        elif kind == b"zset":
            found.extend(client.zrange(key, 0, -1))
        else:
            found.append(client.dump(key))
    return found


def test_introspect_active_key_returns_principal(introspector, console, api_key):
    console.keys[api_key] = _active()

    principal = introspector.introspect(api_key)

    assert principal.subject == "key_123"
    assert principal.org_id == "org_acme"
    assert principal.scopes == {"sessions:read", "sessions:write"}
    assert principal.kind == "api_key"
    assert console.calls == [
        {
            "authorization": f"Bearer {console.token}",
            "content_type": "application/json",
            "body": {"token": api_key},
        }
    ]


def test_introspect_active_key_without_scope_has_no_scopes(
    introspector, console, api_key
):
    answer = _active()
    del answer["scope"]
    console.keys[api_key] = answer

    assert introspector.introspect(api_key).scopes == frozenset()


def test_introspect_inactive_key_refused(introspector, console, api_key):
    console.keys[api_key] = {"active": False}

    with pytest.raises(Unauthorized) as caught:
        introspector.introspect(api_key)

    assert caught.value.status == 401
    assert api_key not in caught.value.message
    assert 'error="invalid_token"' in caught.value.headers["WWW-Authenticate"]
    assert console.call_count == 1


def test_introspect_unknown_key_refused(introspector, console, api_key):
    with pytest.raises(Unauthorized):
        introspector.introspect(api_key)

    assert console.call_count == 1


def test_introspect_console_down_unavailable(
    make_settings, redis_client, closed_port, api_key
):
    settings = make_settings(ENCLAVE_CONSOLE_API_URL=f"http://127.0.0.1:{closed_port}")
    introspector = ApiKeyIntrospector(settings, redis_client)

    with pytest.raises(DependencyUnavailable) as caught:
        introspector.introspect(api_key)

    assert caught.value.status == 503
    assert caught.value.__cause__ is None
    assert redis_client.dbsize() == 0


def test_introspect_console_error_unavailable(
    introspector, console, api_key, redis_client
):
    console.keys[api_key] = _active()
    console.mode = "error"

    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)

    assert console.call_count == 1
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("status", [201, 302, 404, 500, 503])
def test_introspect_non_200_answer_unavailable_whatever_its_body(
    introspector, console, api_key, redis_client, status
):
    # Only a 200 is an answer: a proxy's error page or a redirect that happens
    # to carry an "active" body must not let anyone in.
    console.mode = "raw"
    console.raw_status = status
    console.raw_body = json.dumps(_active()).encode()
    console.raw_headers = {"Location": console.url + "/elsewhere"}

    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)

    assert console.call_count == 1
    assert redis_client.dbsize() == 0


def test_introspect_console_rejecting_our_token_unavailable(
    make_settings, redis_client, console, api_key
):
    console.keys[api_key] = _active()
    settings = make_settings(ENCLAVE_CONSOLE_API_TOKEN="not-the-console-token")
    introspector = ApiKeyIntrospector(settings, redis_client)

    # The console refusing *us* is a deployment fault, not the caller's: 503.
    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)

    assert console.call_count == 1


def test_introspect_slow_console_unavailable(introspector, console, api_key):
    console.keys[api_key] = _active()
    console.mode = "slow"
    console.delay_s = 2.0

    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)
    elapsed = time.monotonic() - started

    # The timeout is 0.5 s; give the scheduler room but stay well under the delay.
    assert elapsed < 1.5
    assert console.call_count == 1


def test_introspect_console_within_timeout_answers(introspector, console, api_key):
    console.keys[api_key] = _active()
    console.mode = "slow"
    console.delay_s = 0.1

    assert introspector.introspect(api_key).org_id == "org_acme"


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b"[]",
        b"{}",
        b'{"active": "yes"}',
        b'{"active": 1, "sub": "key_1", "org_id": "org_1"}',
        b'{"active": true, "sub": "key_1"}',
        b'{"active": true, "sub": "key_1", "org_id": ""}',
        b'{"active": true, "org_id": "org_1"}',
        b'{"active": true, "sub": "key_1", "org_id": "org_1", "scope": ["a"]}',
        b'{"active": true, "sub": "key_1", "org_id": "org_1", "exp": "soon"}',
    ],
    ids=[
        "not-json",
        "not-object",
        "no-active",
        "active-string",
        "active-number",
        "no-org",
        "empty-org",
        "no-sub",
        "scope-list",
        "exp-string",
    ],
)
def test_introspect_malformed_answer_unavailable(
    introspector, console, api_key, redis_client, body
):
    console.mode = "raw"
    console.raw_body = body

    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)

    assert redis_client.dbsize() == 0


def test_introspect_cache_hit_skips_console(introspector, console, api_key):
    console.keys[api_key] = _active()

    first = introspector.introspect(api_key)
    second = introspector.introspect(api_key)

    assert first == second
    assert console.call_count == 1


def test_introspect_cache_shared_between_introspectors(
    settings, redis_client, console, api_key
):
    console.keys[api_key] = _active()
    ApiKeyIntrospector(settings, redis_client).introspect(api_key)

    # Another web process, same Redis: the answer is already there.
    other = ApiKeyIntrospector(settings, redis_client)
    console.mode = "error"

    assert other.introspect(api_key).subject == "key_123"
    assert console.call_count == 1


def test_introspect_active_answer_cached_for_api_key_cache_s(
    introspector, console, api_key, redis_client, settings
):
    console.keys[api_key] = _active()

    introspector.introspect(api_key)

    cache_key = CACHE_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()
    assert redis_client.exists(cache_key)
    assert settings.api_key_cache_s - 2 <= redis_client.ttl(cache_key)
    assert redis_client.ttl(cache_key) <= settings.api_key_cache_s


def test_introspect_inactive_answer_cached_briefly(
    introspector, console, api_key, redis_client
):
    with pytest.raises(Unauthorized):
        introspector.introspect(api_key)
    with pytest.raises(Unauthorized):
        introspector.introspect(api_key)

    assert console.call_count == 1
    cache_key = CACHE_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()
    assert 0 < redis_client.ttl(cache_key) <= INACTIVE_CACHE_S


def test_introspect_cache_expiry_asks_console_again(
    make_settings, redis_client, console, api_key
):
    settings = make_settings(ENCLAVE_API_KEY_CACHE_S="1")
    introspector = ApiKeyIntrospector(settings, redis_client)
    console.keys[api_key] = _active()
    introspector.introspect(api_key)

    # The console revokes the key; once the entry expires, the refusal shows.
    console.keys[api_key] = {"active": False}
    time.sleep(1.2)

    with pytest.raises(Unauthorized):
        introspector.introspect(api_key)
    assert console.call_count == 2


def test_introspect_cache_disabled_asks_every_time(
    make_settings, redis_client, console, api_key
):
    settings = make_settings(ENCLAVE_API_KEY_CACHE_S="0")
    introspector = ApiKeyIntrospector(settings, redis_client)
    console.keys[api_key] = _active()

    introspector.introspect(api_key)
    introspector.introspect(api_key)

    assert console.call_count == 2
    assert redis_client.dbsize() == 0


def test_introspect_failure_not_cached(introspector, console, api_key):
    console.keys[api_key] = _active()
    console.mode = "error"
    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key)

    console.mode = "normal"

    assert introspector.introspect(api_key).org_id == "org_acme"
    assert console.call_count == 2


def test_introspect_expired_exp_refused(introspector, console, api_key):
    console.keys[api_key] = _active(exp=int(time.time()) - 10)

    with pytest.raises(Unauthorized):
        introspector.introspect(api_key)


def test_introspect_near_exp_shortens_cache(
    introspector, console, api_key, redis_client
):
    console.keys[api_key] = _active(exp=int(time.time()) + 4)

    introspector.introspect(api_key)

    cache_key = CACHE_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()
    assert 0 < redis_client.ttl(cache_key) <= 4


def test_introspect_redis_never_holds_key(introspector, console, api_key, redis_client):
    other_key = api_key + "_revoked"
    console.keys[api_key] = _active()
    console.keys[other_key] = {"active": False}

    introspector.introspect(api_key)
    with pytest.raises(Unauthorized):
        introspector.introspect(other_key)

    keys = list(redis_client.scan_iter())
    assert len(keys) == 2
    for cache_key in keys:
        assert cache_key.startswith(CACHE_PREFIX.encode())
    stored = _all_redis_bytes(redis_client)
    for secret in (api_key, other_key):
        # The key's distinctive tail too, in case a prefix were stripped.
        for fragment in (secret, secret[len("ek_test_") :]):
            assert all(fragment.encode() not in item for item in stored)
    cached = json.loads(redis_client.get(keys[0]) or b"{}")
    assert set(cached) <= {"active", "sub", "org_id", "scope"}


def test_introspect_without_console_url_refused_and_warns_once(
    make_settings, redis_client, console, api_key, caplog
):
    settings = make_settings(ENCLAVE_CONSOLE_API_URL="")
    introspector = ApiKeyIntrospector(settings, redis_client)
    caplog.set_level(logging.WARNING, logger="enclave.auth.apikeys")

    for _ in range(3):
        with pytest.raises(Unauthorized):
            introspector.introspect(api_key)

    warnings = [r for r in caplog.records if "API keys are disabled" in r.message]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert console.call_count == 0
    assert redis_client.dbsize() == 0


def test_introspect_redis_down_falls_back_to_console(
    settings, console, api_key, closed_port, caplog
):
    introspector = ApiKeyIntrospector(settings, _dead_redis(settings, closed_port))
    console.keys[api_key] = _active()
    caplog.set_level(logging.WARNING, logger="enclave.auth.apikeys")

    assert introspector.introspect(api_key).org_id == "org_acme"
    assert introspector.introspect(api_key).org_id == "org_acme"

    assert console.call_count == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("cache unreadable" in m for m in messages)
    assert any("cache not written" in m for m in messages)
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_introspect_redis_down_and_console_down_unavailable(
    make_settings, closed_port, api_key
):
    settings = make_settings(ENCLAVE_CONSOLE_API_URL=f"http://127.0.0.1:{closed_port}")
    dead_redis = _dead_redis(settings, closed_port)

    with pytest.raises(DependencyUnavailable):
        ApiKeyIntrospector(settings, dead_redis).introspect(api_key)


def test_introspect_logs_never_hold_key(
    make_settings, redis_client, console, api_key, closed_port, caplog
):
    caplog.set_level(logging.DEBUG)
    settings = make_settings()
    introspector = ApiKeyIntrospector(settings, redis_client)
    inactive_key = api_key + "_off"
    console.keys[api_key] = _active()

    introspector.introspect(api_key)
    introspector.introspect(api_key)
    with pytest.raises(Unauthorized):
        introspector.introspect(inactive_key)
    console.mode = "error"
    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key + "_x")
    console.mode = "raw"
    console.raw_body = json.dumps({"active": "maybe", "token": api_key}).encode()
    with pytest.raises(DependencyUnavailable):
        introspector.introspect(api_key + "_y")
    down = make_settings(ENCLAVE_CONSOLE_API_URL=f"http://127.0.0.1:{closed_port}")
    with pytest.raises(DependencyUnavailable):
        ApiKeyIntrospector(down, redis_client).introspect(api_key + "_z")
    console.mode = "normal"
    dead_redis = _dead_redis(settings, closed_port)
    ApiKeyIntrospector(settings, dead_redis).introspect(api_key)

    assert len(caplog.records) >= 6
    secret_part = api_key[len("ek_test_") :]
    assert secret_part not in caplog.text
    for record in caplog.records:
        assert secret_part not in record.getMessage()
    assert console.token not in caplog.text
    assert settings.jwt_secret not in caplog.text
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    assert digest not in caplog.text
    assert digest[:8] in caplog.text
