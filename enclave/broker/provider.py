"""What a git host provider offers the broker, and the credential it returns.

A provider serves one git host (github.com, a GitHub Enterprise Server, ...):
it says which installation of the deployment's app covers a repository, mints
a token restricted to that one repository with read access to its contents,
and revokes it. A `GitCredential` holds the token for the few seconds between
minting and handing it to the clone step; its `repr` leaves the token out, and
what the audit log keeps of it is `audit_detail()`: a fingerprint and an expiry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from enclave.broker.repository import GitRepository
from enclave.models import rfc3339

FINGERPRINT_HEX = 12


def fingerprint(token: str) -> str:
    """A short, one-way name for a token: enough to match audit rows, never to use."""
    return hashlib.sha256(token.encode()).hexdigest()[:FINGERPRINT_HEX]


@dataclass(frozen=True)
class GitCredential:
    """A short-lived token that can read one repository, and what to audit of it."""

    repository: GitRepository
    token: str = field(repr=False)
    username: str
    permissions: tuple[tuple[str, str], ...]
    issued_at: dt.datetime
    expires_at: dt.datetime
    provider: str
    installation_id: int | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.token)

    def audit_detail(self) -> dict[str, Any]:
        """The `credential.issued` row: everything about the token but the token."""
        return {
            "repository": str(self.repository),
            "permissions": dict(self.permissions),
            "fingerprint": self.fingerprint,
            "expires_at": rfc3339(self.expires_at),
            "provider": self.provider,
            "installation_id": self.installation_id,
        }

    def revocation_detail(self, revoked_at: dt.datetime) -> dict[str, Any]:
        """The `credential.revoked` row."""
        return {
            "repository": str(self.repository),
            "fingerprint": self.fingerprint,
            "revoked_at": rfc3339(revoked_at),
        }


@runtime_checkable
class GitProvider(Protocol):
    """One kind of git host; `host` is the `host[:port]` its repositories live on."""

    name: str
    host: str

    def installation_for(self, repository: GitRepository) -> int:
        """The installation of the app that covers `repository`.

        Raises `RepositoryNotFound` when the repository does not exist or the
        app is not installed on it (hosts answer both the same way).
        """

    def issue(
        self, repository: GitRepository, *, installation_id: int
    ) -> GitCredential:
        """Mint a token that can read `repository`'s contents and nothing else."""

    def revoke(self, credential: GitCredential) -> None:
        """Invalidate the token now; a token that is already dead counts as done."""
