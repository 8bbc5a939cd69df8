"""The project's errors.

Every error a client can see is an `EnclaveError`: it carries its HTTP status, a
stable machine-readable `type` and whether retrying the same call may succeed.
`enclave.api.errors` turns them into the JSON error shape of the public contract
in one place; nothing else builds error responses.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class EnclaveError(Exception):
    """Base class of every error the service reports on purpose."""

    status: int = 500
    type: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str | None = None,
        *,
        errors: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or HTTPStatus(self.status).phrase
        self.errors = errors
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.status,
            "status": HTTPStatus(self.status).phrase,
            "message": self.message,
            "type": self.type,
        }
        if self.errors:
            body["errors"] = self.errors
        return body


class BadRequest(EnclaveError):
    status = 400
    type = "bad_request"


class Unauthorized(EnclaveError):
    status = 401
    type = "unauthorized"

    def __init__(self, message: str = "Missing or invalid credentials.", **kwargs):
        super().__init__(message, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="enclave"')


class Forbidden(EnclaveError):
    status = 403
    type = "forbidden"


class NotFound(EnclaveError):
    status = 404
    type = "not_found"


class SessionNotFound(NotFound):
    type = "session_not_found"

    def __init__(self, message: str = "No such session.", **kwargs):
        super().__init__(message, **kwargs)


class Conflict(EnclaveError):
    status = 409
    type = "conflict"


class PayloadTooLarge(EnclaveError):
    status = 413
    type = "payload_too_large"


class ValidationFailed(EnclaveError):
    status = 422
    type = "validation_failed"


class QuotaExceeded(EnclaveError):
    status = 429
    type = "quota_exceeded"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int, **kwargs):
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = str(retry_after_s)


class DependencyUnavailable(EnclaveError):
    """A database, Redis, the console API or a backend engine cannot be reached."""

    status = 503
    type = "dependency_unavailable"
    retryable = True


class BackendError(EnclaveError):
    """A sandbox backend failed; adapters keep the client library's error as the cause."""

    status = 500
    type = "backend_error"


class BackendUnavailable(BackendError):
    """The backend's engine or API server cannot be reached right now."""

    status = 503
    type = "backend_unavailable"
    retryable = True


class ConfigurationError(EnclaveError):
    """The deployment's settings are unusable; raised at start-up, never to a client."""

    type = "configuration_error"
