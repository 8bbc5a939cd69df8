"""Who is calling: the principal an authenticated request carries, and its scopes.

A principal is built by one of three paths: a user JWT (`kind="user"`), an API
key the console vouched for (`kind="api_key"`), or the development bypass
(`kind="development"`). Views only ever see this object, never the credential
it was built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SESSIONS_READ = "sessions:read"
SESSIONS_WRITE = "sessions:write"
KNOWN_SCOPES = frozenset({SESSIONS_READ, SESSIONS_WRITE})

PrincipalKind = Literal["user", "api_key", "development"]

REALM = "enclave"


@dataclass(frozen=True)
class Principal:
    subject: str
    org_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    kind: PrincipalKind = "user"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


# Used only when ENCLAVE_AUTH_DISABLED=1, which Settings refuses in production.
DEVELOPMENT_PRINCIPAL = Principal(
    subject="user_dev",
    org_id="org_dev",
    scopes=KNOWN_SCOPES,
    kind="development",
)


def parse_scopes(value: object) -> frozenset[str]:
    """The scopes of a space-separated `scope` claim; a missing claim grants none.

    Raises TypeError when the claim is present but not a string, so that each
    caller can decide which error that is (a bad token, or a bad console answer).
    """
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        raise TypeError("scope must be a space-separated string")

    return frozenset(value.split())


def bearer_challenge(error: str | None = None, scope: str | None = None) -> str:
    """A `WWW-Authenticate` value in the RFC 6750 form.

    A request that sent no credential gets the bare challenge; one whose
    credential was refused names the reason, so that clients can tell a typo in
    the header (`invalid_request`) from a revoked key (`invalid_token`).
    """
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if scope:
        parts.append(f'scope="{scope}"')

    return "Bearer " + ", ".join(parts)
