"""API keys: asking the console whether a key is live, with a short Redis cache.

The console owns API keys; this service only asks about them, RFC 7662 style:
`POST {console}/internal/api-keys/introspect` with `{"token": key}` answers
`{"active": true, "sub", "org_id", "scope"}` or `{"active": false}`.

Failure modes are kept apart on purpose. A key the console calls inactive is
the caller's problem (401). A console that cannot answer, or answers something
that is not a well-formed introspection response, is ours (503): a request is
never let through because the console could not be asked.

Answers are cached in Redis under a SHA-256 of the key, so a key is checked
once per `api_key_cache_s` rather than once per request, and a revoked key
stops working within that time. Refusals are cached for a few seconds only, so
a key created a moment ago works almost at once. The key itself is sent to the
console and nowhere else: not to Redis, not to a log line (which may carry the
first characters of the hash, enough to correlate two lines and no more).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import redis
import requests

from enclave.auth.principal import Principal, bearer_challenge, parse_scopes
from enclave.config import Settings
from enclave.errors import DependencyUnavailable, Unauthorized

logger = logging.getLogger(__name__)

INTROSPECT_PATH = "/internal/api-keys/introspect"
CACHE_PREFIX = "enclave:apikey:"
INACTIVE_CACHE_S = 5

_INACTIVE: dict[str, Any] = {"active": False}


class MalformedAnswer(ValueError):
    """The console answered, but not with a well-formed introspection response."""


class ApiKeyIntrospector:
    """Turns an API key into a principal by asking the console, through a cache.

    One instance is shared by every request of a web process; it keeps no
    per-request state, and `requests.Session` pools the console connections.
    """

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        http_session: requests.Session | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis_client
        self._http = http_session or requests.Session()
        self._warned_disabled = False

    def introspect(self, key: str) -> Principal:
        """The principal behind `key`; `Unauthorized` when the key is not live.

        Raises `DependencyUnavailable` when the console cannot give an answer.
        """
        if not self._settings.console_api_url:
            if not self._warned_disabled:
                # A race may log this twice; that is cheaper than a lock.
                self._warned_disabled = True
                logger.warning(
                    "API keys are disabled: ENCLAVE_CONSOLE_API_URL is not set, "
                    "every bearer credential that is not a JWT is refused"
                )
            raise _invalid_key()

        digest = hashlib.sha256(key.encode()).hexdigest()
        answer = self._read_cache(digest)
        if answer is None:
            answer = self._ask_console(key, digest)
            self._write_cache(digest, answer)
        if not answer["active"]:
            logger.info("api key refused: inactive key_hash=%s", digest[:8])
            raise _invalid_key()

        return Principal(
            subject=answer["sub"],
            org_id=answer["org_id"],
            scopes=frozenset(answer["scopes"]),
            kind="api_key",
        )

    def _ask_console(self, key: str, digest: str) -> dict[str, Any]:
        url = self._settings.console_api_url.rstrip("/") + INTROSPECT_PATH
        headers = {"Accept": "application/json"}
        if self._settings.console_api_token:
            headers["Authorization"] = f"Bearer {self._settings.console_api_token}"

        started = time.monotonic()
        try:
            response = self._http.post(
                url,
                json={"token": key},
                headers=headers,
                # TODO: this bounds the connect and each socket read, not the
                # whole call; a console trickling bytes can hold a request
                # longer. A total deadline needs a watchdog around the call.
                timeout=self._settings.console_api_timeout_s,
                # A redirect would resend the key to wherever it points.
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            # Not chained: the exception holds the prepared request, whose body
            # is the key, and a cause ends up in tracebacks and error reports.
            logger.warning(
                "console API unreachable: %s key_hash=%s duration_ms=%d",
                type(exc).__name__,
                digest[:8],
                _elapsed_ms(started),
            )
            raise _console_unavailable() from None
        duration_ms = _elapsed_ms(started)

        if response.status_code != 200:
            # A 4xx here is our misconfiguration (a wrong console token or
            # URL), not the caller's fault, so it is a 503 as well.
            logger.warning(
                "console API answered status=%d key_hash=%s duration_ms=%d",
                response.status_code,
                digest[:8],
                duration_ms,
            )
            raise _console_unavailable()
        try:
            answer = _normalise(response.json())
        except ValueError as exc:
            logger.warning(
                "console API answer is malformed: %s key_hash=%s",
                exc,
                digest[:8],
            )
            raise _console_unavailable() from None

        logger.debug(
            "api key introspected key_hash=%s active=%s org_id=%s duration_ms=%d",
            digest[:8],
            answer["active"],
            answer.get("org_id"),
            duration_ms,
        )
        return answer

    def _read_cache(self, digest: str) -> dict[str, Any] | None:
        try:
            raw = self._redis.get(CACHE_PREFIX + digest)
        except redis.RedisError as exc:
            logger.warning(
                "api key cache unreadable, asking the console: %s key_hash=%s",
                type(exc).__name__,
                digest[:8],
            )
            return None
        if raw is None:
            return None

        try:
            answer = _normalise(json.loads(raw))
        except ValueError:
            # Only this module writes these entries; a bad one is a leftover of
            # another version, and asking the console again is always safe.
            logger.warning("api key cache entry unreadable key_hash=%s", digest[:8])
            return None
        logger.debug("api key cache hit key_hash=%s", digest[:8])
        return answer

    def _write_cache(self, digest: str, answer: dict[str, Any]) -> None:
        ttl_s = self._cache_ttl_s(answer)
        if ttl_s <= 0:
            return
        stored = dict(answer)
        stored.pop("exp", None)
        if "scopes" in stored:
            stored["scope"] = " ".join(sorted(stored.pop("scopes")))

        try:
            self._redis.set(CACHE_PREFIX + digest, json.dumps(stored), ex=ttl_s)
        except redis.RedisError as exc:
            # The answer is still good for this request; the next one simply
            # asks the console again.
            logger.warning(
                "api key cache not written: %s key_hash=%s",
                type(exc).__name__,
                digest[:8],
            )

    def _cache_ttl_s(self, answer: dict[str, Any]) -> int:
        ttl_s = int(self._settings.api_key_cache_s)
        if not answer["active"]:
            return min(ttl_s, INACTIVE_CACHE_S)
        exp = answer.get("exp")
        if exp is not None:
            # A key that expires sooner than the cache would must not outlive
            # its expiry here.
            ttl_s = min(ttl_s, int(exp - time.time()))

        return ttl_s


def _normalise(raw: object) -> dict[str, Any]:
    """A well-formed introspection answer, or `MalformedAnswer` saying what is wrong.

    Active answers come back as `{"active": True, "sub", "org_id", "scopes"}`
    (and `exp` when the console sent one); every inactive answer is the same
    `{"active": False}`.
    """
    if not isinstance(raw, dict):
        raise MalformedAnswer("the answer is not a JSON object")
    active = raw.get("active")
    if not isinstance(active, bool):
        raise MalformedAnswer("`active` is missing or not a boolean")
    if not active:
        return dict(_INACTIVE)

    answer: dict[str, Any] = {"active": True}
    for name in ("sub", "org_id"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise MalformedAnswer(f"`{name}` is missing or empty in an active answer")
        answer[name] = value
    try:
        answer["scopes"] = parse_scopes(raw.get("scope"))
    except TypeError as exc:
        raise MalformedAnswer(str(exc)) from None
    exp = raw.get("exp")
    if exp is not None:
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise MalformedAnswer("`exp` is not a number")
        if exp <= time.time():
            # RFC 7662 lets the console report an expiry; a key past it is
            # inactive whatever `active` says.
            return dict(_INACTIVE)
        answer["exp"] = exp

    return answer


def _invalid_key() -> Unauthorized:
    return Unauthorized(
        "Invalid API key.",
        headers={"WWW-Authenticate": bearer_challenge("invalid_token")},
    )


def _console_unavailable() -> DependencyUnavailable:
    return DependencyUnavailable("The API key service is unavailable; retry later.")


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
