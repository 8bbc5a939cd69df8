"""A session's egress policy as the proxy reads it from Redis.

The worker writes the policy before the sandbox starts and deletes it when
the session's job ends; a TTL (the session's timeout plus a margin) removes
it should the worker die first. The key holds the session's organisation,
its allow-list, the names of its service bindings and the SHA-256 of the
per-session proxy token: the token itself exists only in the worker's memory
and inside the sandbox, so reading Redis does not let anyone act as a session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

import redis

KEY_PREFIX = "enclave:egress:policy:"
# How long a policy outlives the session's own timeout before Redis drops it.
TTL_MARGIN_S = 300


def policy_key(session_id: str) -> str:
    return KEY_PREFIX + session_id


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Policy:
    session_id: str
    org_id: str
    allow: tuple[str, ...]
    bindings: tuple[str, ...]
    token_sha256: str
    # The session whose log receives this policy's reports: a clone step's
    # policy reports to the session it clones for.
    report_to: str | None = None

    @property
    def reporting_session(self) -> str:
        return self.report_to or self.session_id

    def accepts(self, token: str) -> bool:
        """Whether `token` is this session's proxy token (in constant time)."""
        return hmac.compare_digest(token_digest(token), self.token_sha256)

    def to_json(self) -> str:
        return json.dumps(
            {
                "org_id": self.org_id,
                "allow": list(self.allow),
                "bindings": list(self.bindings),
                "token_sha256": self.token_sha256,
                "report_to": self.report_to,
            }
        )

    @classmethod
    def from_json(cls, session_id: str, raw: bytes | str) -> Policy:
        data = json.loads(raw)
        return cls(
            session_id=session_id,
            org_id=data["org_id"],
            allow=tuple(data["allow"]),
            bindings=tuple(data["bindings"]),
            token_sha256=data["token_sha256"],
            report_to=data.get("report_to"),
        )


def store_policy(client: redis.Redis, policy: Policy, ttl_s: float) -> None:
    client.set(
        policy_key(policy.session_id),
        policy.to_json(),
        ex=max(1, int(ttl_s) + TTL_MARGIN_S),
    )


def load_policy(client: redis.Redis, session_id: str) -> Policy | None:
    raw = client.get(policy_key(session_id))
    if raw is None:
        return None
    return Policy.from_json(session_id, raw)


def remove_policy(client: redis.Redis, session_id: str) -> None:
    client.delete(policy_key(session_id))
