"""Errors of the credential broker.

Two audiences read them. A caller of `POST /sessions` sees `InvalidGitSource`
and `GitSourceRefused` as 422s; the second carries one fixed message whatever
the reason, so that a refusal never tells whether a repository exists. A
session that fails while its token is minted ends `failed` with the message of
one of the `CredentialError`s as its `error`: each says what went wrong in
words a user can act on, and none ever holds a token, a key or a response body
from the git host.
"""

from __future__ import annotations

from typing import Any

from enclave.errors import DependencyUnavailable, EnclaveError, ValidationFailed

REFUSED_MESSAGE = (
    "This organisation is not entitled to clone that repository on this deployment."
)


def _source_errors(field: str, message: str) -> dict[str, Any]:
    return {"json": {"source": {"git": {field: [message]}}}}


class InvalidGitSource(ValidationFailed):
    """The git URL or ref is malformed; the message never echoes the input."""

    type = "invalid_git_source"

    def __init__(self, message: str, *, field: str = "url") -> None:
        super().__init__(
            "The git source is not valid.",
            errors=_source_errors(field, message),
        )
        self.field = field
        self.reason = message


class GitSourceRefused(ValidationFailed):
    """The organisation may not clone the repository (or it does not exist).

    The message and field errors are the same for every refusal. `repository`
    is the normalised name, kept for the audit row the orchestrator writes;
    `reason` says which rule failed, for that row and the logs only.
    """

    type = "git_source_refused"

    def __init__(self, repository: str, reason: str) -> None:
        super().__init__(REFUSED_MESSAGE, errors=_source_errors("url", REFUSED_MESSAGE))
        self.repository = repository
        self.reason = reason

    def audit_detail(self) -> dict[str, Any]:
        return {"repository": self.repository, "reason": self.reason}


class CredentialError(EnclaveError):
    """A git credential could not be issued; the session cannot get its source."""

    status = 502
    type = "credential_error"


class RepositoryNotFound(CredentialError):
    type = "repository_not_found"


class InstallationDenied(CredentialError):
    type = "installation_denied"


class ProviderRejected(CredentialError):
    """The git host refused the deployment's own credentials (a setup problem)."""

    type = "provider_rejected"


class ProviderProtocolError(CredentialError):
    """The git host answered something this client does not understand."""

    type = "provider_protocol_error"


class ProviderUnavailable(DependencyUnavailable):
    """The git host's API could not be reached or failed; retrying may help."""

    type = "provider_unavailable"


class ProviderRateLimited(ProviderUnavailable):
    type = "provider_rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s
