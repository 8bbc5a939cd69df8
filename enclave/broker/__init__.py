"""The credential broker: entitlements and short-lived, repository-scoped git tokens.

`CredentialBroker.from_settings(settings)` builds it once per process. The
orchestrator calls `check_entitlement(org_id, url)` when a session asks for a
git source; the worker calls `issue_git_token(...)` right before the clone
step and `revoke_git_token(credential)` right after it. `enclave.broker.clone`
is what a backend uses to run the clone step; `enclave.sandbox.clone_step` is
the step itself.
"""

from __future__ import annotations

from enclave.broker.broker import CredentialBroker, Entitlement
from enclave.broker.errors import (
    CredentialError,
    GitSourceRefused,
    InstallationDenied,
    InvalidGitSource,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    RepositoryNotFound,
)
from enclave.broker.provider import GitCredential, GitProvider, fingerprint
from enclave.broker.repository import GitRepository, parse_git_url, validate_ref

__all__ = [
    "CredentialBroker",
    "CredentialError",
    "Entitlement",
    "GitCredential",
    "GitProvider",
    "GitRepository",
    "GitSourceRefused",
    "InstallationDenied",
    "InvalidGitSource",
    "ProviderProtocolError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderUnavailable",
    "RepositoryNotFound",
    "fingerprint",
    "parse_git_url",
    "validate_ref",
]
