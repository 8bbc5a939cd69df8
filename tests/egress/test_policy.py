"""A session's egress policy in Redis (`enclave.egress.policy`), against real Redis."""

from __future__ import annotations

from enclave.egress.policy import (
    TTL_MARGIN_S,
    Policy,
    load_policy,
    new_token,
    policy_key,
    remove_policy,
    store_policy,
    token_digest,
)


def make_policy(token: str) -> Policy:
    return Policy(
        session_id="ses_policy",
        org_id="org_p",
        allow=("api.test", "*.svc.test"),
        bindings=("github",),
        token_sha256=token_digest(token),
    )


def test_policy_round_trips_through_redis_with_a_ttl(redis_client):
    token = new_token()
    store_policy(redis_client, make_policy(token), ttl_s=30)

    loaded = load_policy(redis_client, "ses_policy")

    assert loaded == make_policy(token)
    ttl = redis_client.ttl(policy_key("ses_policy"))
    assert 30 < ttl <= 30 + TTL_MARGIN_S


def test_policy_holds_the_token_hash_never_the_token(redis_client):
    token = new_token()
    store_policy(redis_client, make_policy(token), ttl_s=30)

    stored = redis_client.get(policy_key("ses_policy"))

    assert token.encode() not in stored
    assert token_digest(token).encode() in stored


def test_policy_accepts_only_its_token():
    token = new_token()
    policy = make_policy(token)

    assert policy.accepts(token)
    assert not policy.accepts(token + "x")
    assert not policy.accepts("")
    assert not policy.accepts(new_token())


def test_policy_removed_is_gone(redis_client):
    store_policy(redis_client, make_policy(new_token()), ttl_s=30)

    remove_policy(redis_client, "ses_policy")

    assert load_policy(redis_client, "ses_policy") is None
    assert load_policy(redis_client, "ses_never") is None


def test_policy_tokens_are_random_and_long():
    tokens = {new_token() for _ in range(50)}

    assert len(tokens) == 50
    assert all(len(t) >= 40 for t in tokens)
