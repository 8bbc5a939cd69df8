"""User JWTs: telling them apart from API keys, verifying them, and minting them.

Only HS256 tokens signed with `ENCLAVE_JWT_SECRET` are accepted. The list of
algorithms is fixed here and never taken from the token's own header, so an
`alg: none` token or one signed with an RSA key (whose public half an attacker
could pass off as an HMAC secret) is refused before any claim is read.

Every refusal is the same short `Unauthorized`: the message says what kind of
problem it was at most, never echoes the token, and the log line says which
check failed without the token either.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Iterable

import jwt

from enclave.auth.principal import Principal, bearer_challenge, parse_scopes
from enclave.config import Settings
from enclave.errors import ConfigurationError, Unauthorized

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"

# Tokens minted on another host may carry an `iat` a little in our future or
# an `exp` a little in our past; a few seconds absorb ordinary clock drift.
CLOCK_SKEW_S = 5

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


def looks_like_jwt(value: str) -> bool:
    """Whether a bearer credential has the shape of a compact JWS.

    Three base64url segments whose first decodes to a JSON object with `alg`.
    The signature segment may be empty: an unsigned (`alg: none`) token must be
    recognised as a JWT and refused here, not sent to the console as an API key.
    """
    segments = value.split(".")
    if len(segments) != 3:
        return False
    header, payload, _ = segments
    if not header or not payload:
        return False
    if not all(_SEGMENT.fullmatch(segment) for segment in segments):
        return False

    try:
        decoded = json.loads(_b64url_decode(header))
    except ValueError:  # bad base64, bad UTF-8 and bad JSON alike
        return False

    return isinstance(decoded, dict) and "alg" in decoded


def decode_user_token(token: str, settings: Settings) -> Principal:
    """Verify a user JWT and return its principal, or raise `Unauthorized`."""
    if not settings.jwt_secret:
        # Settings.validate refuses this unless auth is disabled, in which case
        # no token is ever decoded; refusing here keeps an empty key unusable.
        logger.error("user token refused: no JWT secret is configured")
        raise _invalid_token()

    required = ["exp", "sub", "org_id"]
    if settings.jwt_issuer:
        required.append("iss")
    if settings.jwt_audience:
        required.append("aud")
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[ALGORITHM],
            issuer=settings.jwt_issuer or None,
            audience=settings.jwt_audience or None,
            leeway=CLOCK_SKEW_S,
            options={
                "require": required,
                # Without a configured audience, `aud` is not ours to judge.
                "verify_aud": bool(settings.jwt_audience),
            },
        )
    except jwt.ExpiredSignatureError:
        logger.info("user token refused: expired")
        raise _invalid_token("The token has expired.") from None
    except jwt.InvalidTokenError as exc:
        # The exception's text names the failed check (a claim, the
        # algorithm); it never contains the token or the secret.
        logger.info("user token refused: %s (%s)", type(exc).__name__, exc)
        raise _invalid_token() from None

    subject = claims.get("sub")
    org_id = claims.get("org_id")
    if not _non_empty_string(subject) or not _non_empty_string(org_id):
        logger.info("user token refused: sub or org_id is not a non-empty string")
        raise _invalid_token()
    try:
        scopes = parse_scopes(claims.get("scope"))
    except TypeError:
        logger.info("user token refused: scope is not a string")
        raise _invalid_token() from None

    return Principal(subject=subject, org_id=org_id, scopes=scopes, kind="user")


def mint_user_token(
    settings: Settings,
    subject: str,
    org_id: str,
    scopes: Iterable[str] | str,
    ttl_s: int,
) -> str:
    """Sign a user JWT that `decode_user_token` accepts under the same settings.

    For development and tests; in production the console issues user tokens.
    """
    if not settings.jwt_secret:
        raise ConfigurationError("ENCLAVE_JWT_SECRET is needed to mint a token")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if isinstance(scopes, str):
        # A lone string is a scope claim already; iterating it would yield
        # single characters.
        scopes = scopes.split()

    now = int(time.time())
    claims = {
        "sub": subject,
        "org_id": org_id,
        "scope": " ".join(sorted(set(scopes))),
        "iat": now,
        "exp": now + int(ttl_s),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience

    return jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM)


def _invalid_token(message: str = "Invalid token.") -> Unauthorized:
    return Unauthorized(
        message,
        headers={"WWW-Authenticate": bearer_challenge("invalid_token")},
    )


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _non_empty_string(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
