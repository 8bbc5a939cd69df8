"""Authenticating Flask requests and checking their scopes.

A view declares the scope it needs with `@require_scope("sessions:read")`. The
decorator authenticates the request on first use, keeps the principal on
`flask.g.principal` for the rest of the request (so stacked decorators and
`current_principal()` never ask the console twice), and refuses the call with
403 when the scope is missing.

The app factory puts an object with `settings` and `introspector` attributes
at `app.extensions["enclave"]`; that is where the decorator finds them.
Failures are raised as `enclave.errors` classes and turned into responses by
the central error handler.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, g, request

from enclave.auth.apikeys import ApiKeyIntrospector
from enclave.auth.principal import (
    DEVELOPMENT_PRINCIPAL,
    KNOWN_SCOPES,
    Principal,
    bearer_challenge,
)
from enclave.auth.tokens import decode_user_token, looks_like_jwt
from enclave.config import Settings
from enclave.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

# The name the OpenAPI spec gives the bearer scheme; the app factory registers
# SECURITY_SCHEME under it.
SECURITY_SCHEME_NAME = "bearerAuth"
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": (
        "A user JWT (HS256) or an API key issued by the console. "
        "Scopes: sessions:read for GET, sessions:write for POST and DELETE."
    ),
}

# RFC 6750 `b64token`; anything else in the header is a malformed request.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
# Far above any real JWT or API key; a longer value is not worth hashing.
MAX_CREDENTIAL_CHARS = 8192

F = TypeVar("F", bound=Callable[..., Any])


def authenticate(
    settings: Settings,
    introspector: ApiKeyIntrospector | None,
) -> Principal:
    """The principal of the current request, from its `Authorization` header."""
    if settings.auth_disabled:
        logger.warning(
            "authentication is disabled, request let through as the development "
            "principal method=%s path=%s",
            request.method,
            request.path,
        )
        return DEVELOPMENT_PRINCIPAL

    credential = _bearer_credential(request.headers.get("Authorization"))
    if looks_like_jwt(credential):
        return decode_user_token(credential, settings)
    if introspector is None:
        raise Unauthorized(
            "Invalid API key.",
            headers={"WWW-Authenticate": bearer_challenge("invalid_token")},
        )

    return introspector.introspect(credential)


def current_principal() -> Principal:
    """The principal of the current request, authenticating it on first use."""
    principal = g.get("principal")
    if principal is None:
        extension = current_app.extensions.get("enclave")
        if extension is None:
            raise RuntimeError(
                'app.extensions["enclave"] is not set; the app factory must set it '
                "before any view that needs authentication is served"
            )
        principal = authenticate(extension.settings, extension.introspector)
        g.principal = principal

    return principal


def require_scope(scope: str) -> Callable[[F], F]:
    """Refuse the view with 401 without credentials and 403 without `scope`."""
    if scope not in KNOWN_SCOPES:
        # A typo here would lock every caller out of the view; fail at import.
        raise ValueError(f"unknown scope {scope!r}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = current_principal()
            if not principal.has_scope(scope):
                logger.info(
                    "request refused: scope missing scope=%s org_id=%s kind=%s",
                    scope,
                    principal.org_id,
                    principal.kind,
                )
                raise Forbidden(
                    f"This call needs the {scope} scope.",
                    headers={
                        "WWW-Authenticate": bearer_challenge(
                            "insufficient_scope", scope=scope
                        )
                    },
                )

            return view(*args, **kwargs)

        _document_security(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorator


def warn_if_auth_disabled(settings: Settings) -> bool:
    """Log a start-up warning when the development bypass is on; say if it is."""
    if not settings.auth_disabled:
        return False

    logger.warning(
        "ENCLAVE_AUTH_DISABLED is set: every request runs as org_id=%s subject=%s "
        "with all scopes; never use this outside development env=%s",
        DEVELOPMENT_PRINCIPAL.org_id,
        DEVELOPMENT_PRINCIPAL.subject,
        settings.env,
    )
    return True


def _bearer_credential(header: str | None) -> str:
    if not header:
        # RFC 6750: a request without credentials gets the bare challenge.
        raise Unauthorized("Missing credentials: send Authorization: Bearer <token>.")
    match = _BEARER.fullmatch(header.strip())
    if match is None or len(match.group(1)) > MAX_CREDENTIAL_CHARS:
        raise Unauthorized(
            "Malformed Authorization header: expected Bearer <token>.",
            headers={"WWW-Authenticate": bearer_challenge("invalid_request")},
        )

    return match.group(1)


def _document_security(view: Callable[..., Any]) -> None:
    """Mark the view as needing the bearer scheme in the flask-smorest spec."""
    # Copied, like flask-smorest's own decorators do, so the wrapped view's
    # documentation is left as it was.
    apidoc = copy.deepcopy(getattr(view, "_apidoc", {}))
    manual_doc = apidoc.setdefault("manual_doc", {})
    manual_doc["security"] = [{SECURITY_SCHEME_NAME: []}]
    view._apidoc = apidoc  # type: ignore[attr-defined]
