"""User JWTs: what `decode_user_token` accepts and refuses, and `looks_like_jwt`."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave.auth import decode_user_token, looks_like_jwt, mint_user_token
from enclave.errors import ConfigurationError, Unauthorized


def _claims(**overrides):
    now = int(time.time())
    claims = {
        "sub": "user_42",
        "org_id": "org_acme",
        "scope": "sessions:read sessions:write",
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims, secret, algorithm="HS256", headers=None):
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def _b64(data: dict) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _assert_refused(token, settings):
    with pytest.raises(Unauthorized) as caught:
        decode_user_token(token, settings)
    err = caught.value
    assert err.status == 401
    if token:
        assert token not in err.message
    assert settings.jwt_secret not in err.message
    assert err.headers["WWW-Authenticate"].startswith("Bearer ")
    return err


def test_decode_user_token_valid_returns_principal(settings):
    token = _sign(_claims(), settings.jwt_secret)

    principal = decode_user_token(token, settings)

    assert principal.subject == "user_42"
    assert principal.org_id == "org_acme"
    assert principal.scopes == {"sessions:read", "sessions:write"}
    assert principal.kind == "user"
    assert principal.has_scope("sessions:read")
    assert not principal.has_scope("sessions:admin")


def test_decode_user_token_expired_refused(settings):
    now = int(time.time())
    token = _sign(_claims(iat=now - 600, exp=now - 60), settings.jwt_secret)

    err = _assert_refused(token, settings)

    assert "expired" in err.message
    assert 'error="invalid_token"' in err.headers["WWW-Authenticate"]


def test_decode_user_token_without_exp_refused(settings):
    _assert_refused(_sign(_claims(exp=None), settings.jwt_secret), settings)


def test_decode_user_token_wrong_secret_refused(settings):
    token = _sign(_claims(), "another-secret-that-is-long-enough-for-hs256!")

    _assert_refused(token, settings)


def test_decode_user_token_alg_none_refused(settings):
    header = _b64({"alg": "none", "typ": "JWT"})
    token = f"{header}.{_b64(_claims())}."

    assert looks_like_jwt(token)
    _assert_refused(token, settings)


def test_decode_user_token_alg_none_with_forged_signature_refused(settings):
    header = _b64({"alg": "none", "typ": "JWT"})
    real = _sign(_claims(), settings.jwt_secret)
    token = f"{header}.{_b64(_claims())}.{real.split('.')[2]}"

    _assert_refused(token, settings)


def test_decode_user_token_rs256_refused(settings):
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = _sign(_claims(), pem, algorithm="RS256")

    assert looks_like_jwt(token)
    _assert_refused(token, settings)


def test_decode_user_token_hs512_with_right_secret_refused(settings):
    token = _sign(_claims(), settings.jwt_secret, algorithm="HS512")

    _assert_refused(token, settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"org_id": None},
        {"org_id": ""},
        {"org_id": "   "},
        {"org_id": 42},
        {"org_id": ["org_acme"]},
        {"sub": None},
        {"sub": ""},
    ],
    ids=[
        "org-missing",
        "org-empty",
        "org-blank",
        "org-number",
        "org-list",
        "sub-missing",
        "sub-empty",
    ],
)
def test_decode_user_token_bad_identity_claims_refused(settings, overrides):
    claims = _claims()
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}

    _assert_refused(_sign(claims, settings.jwt_secret), settings)


def test_decode_user_token_scope_missing_gives_no_scopes(settings):
    token = _sign(_claims(scope=None), settings.jwt_secret)

    principal = decode_user_token(token, settings)

    assert principal.scopes == frozenset()
    assert not principal.has_scope("sessions:read")


def test_decode_user_token_scope_not_a_string_refused(settings):
    token = _sign(_claims(scope=["sessions:read"]), settings.jwt_secret)

    _assert_refused(token, settings)


def test_decode_user_token_not_yet_valid_refused(settings):
    now = int(time.time())
    token = _sign(_claims(nbf=now + 600, exp=now + 900), settings.jwt_secret)

    _assert_refused(token, settings)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 5000],
    ids=["empty", "word", "dots", "two-segments", "long"],
)
def test_decode_user_token_garbage_refused(settings, token):
    _assert_refused(token, settings)


def test_decode_user_token_issuer_and_audience_accepted(make_settings):
    settings = make_settings(
        ENCLAVE_JWT_ISSUER="https://console.example",
        ENCLAVE_JWT_AUDIENCE="enclave",
    )
    token = _sign(
        _claims(iss="https://console.example", aud="enclave"),
        settings.jwt_secret,
    )

    assert decode_user_token(token, settings).org_id == "org_acme"


@pytest.mark.parametrize(
    "overrides",
    [
        {"iss": "https://evil.example", "aud": "enclave"},
        {"iss": "https://console.example", "aud": "someone-else"},
        {"aud": "enclave"},
        {"iss": "https://console.example"},
    ],
    ids=["wrong-iss", "wrong-aud", "missing-iss", "missing-aud"],
)
def test_decode_user_token_wrong_issuer_or_audience_refused(make_settings, overrides):
    settings = make_settings(
        ENCLAVE_JWT_ISSUER="https://console.example",
        ENCLAVE_JWT_AUDIENCE="enclave",
    )
    token = _sign(_claims(**overrides), settings.jwt_secret)

    _assert_refused(token, settings)


def test_decode_user_token_audience_ignored_when_not_configured(settings):
    token = _sign(_claims(aud="anything", iss="anyone"), settings.jwt_secret)

    assert decode_user_token(token, settings).subject == "user_42"


def test_decode_user_token_refusal_logs_neither_token_nor_secret(settings, caplog):
    caplog.set_level("DEBUG")
    now = int(time.time())
    tokens = [
        _sign(_claims(exp=now - 60), settings.jwt_secret),
        _sign(_claims(), "another-secret-that-is-long-enough-for-hs256!"),
        _sign(_claims(org_id=None), settings.jwt_secret),
        _sign(_claims(), settings.jwt_secret, algorithm="HS512"),
    ]

    for token in tokens:
        with pytest.raises(Unauthorized):
            decode_user_token(token, settings)

    assert caplog.records, "refusals should be logged"
    for token in tokens:
        assert token not in caplog.text
        assert token.split(".")[2] not in caplog.text
    assert settings.jwt_secret not in caplog.text


def test_mint_user_token_roundtrip(make_settings):
    settings = make_settings(
        ENCLAVE_JWT_ISSUER="https://console.example",
        ENCLAVE_JWT_AUDIENCE="enclave",
    )

    token = mint_user_token(settings, "user_7", "org_7", ["sessions:read"], 60)
    principal = decode_user_token(token, settings)

    assert (principal.subject, principal.org_id) == ("user_7", "org_7")
    assert principal.scopes == {"sessions:read"}
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert 55 <= claims["exp"] - time.time() <= 61


def test_mint_user_token_scope_string_is_split(settings):
    token = mint_user_token(
        settings, "user_7", "org_7", "sessions:write sessions:read", 60
    )

    assert decode_user_token(token, settings).scopes == {
        "sessions:read",
        "sessions:write",
    }


def test_mint_user_token_without_secret_refused(settings):
    with pytest.raises(ConfigurationError):
        mint_user_token(settings.replace(jwt_secret=""), "u", "o", [], 60)


def test_looks_like_jwt_real_token(settings):
    assert looks_like_jwt(_sign(_claims(), settings.jwt_secret))


@pytest.mark.parametrize(
    "value",
    [
        "ek_live_0123456789abcdefABCDEF",
        "a.b.c",
        "..",
        f"{_b64({'typ': 'JWT'})}.{_b64({})}.sig",
        f"{_b64(['alg'])}.{_b64({})}.sig",
        "!!!.???.***",
        f"{_b64({'alg': 'HS256'})}.{_b64({})}",
        f"{_b64({'alg': 'HS256'})}.{_b64({})}.sig.extra",
        f"{_b64({'alg': 'HS256'})}..sig",
    ],
    ids=[
        "api-key",
        "short-dots",
        "empty-segments",
        "header-without-alg",
        "header-not-object",
        "not-base64url",
        "two-segments",
        "four-segments",
        "empty-payload",
    ],
)
def test_looks_like_jwt_other_values(value):
    assert not looks_like_jwt(value)
