"""Authentication and scope checks for the public API.

A request carries `Authorization: Bearer <credential>`: a user JWT, verified
locally (`tokens`), or an API key, introspected against the console
(`apikeys`). Either way the view sees a `Principal`; `require_scope` guards a
view and `current_principal` hands the principal to it.
"""

from enclave.auth.apikeys import ApiKeyIntrospector
from enclave.auth.decorators import (
    SECURITY_SCHEME,
    SECURITY_SCHEME_NAME,
    authenticate,
    current_principal,
    require_scope,
    warn_if_auth_disabled,
)
from enclave.auth.principal import (
    DEVELOPMENT_PRINCIPAL,
    KNOWN_SCOPES,
    SESSIONS_READ,
    SESSIONS_WRITE,
    Principal,
)
from enclave.auth.tokens import decode_user_token, looks_like_jwt, mint_user_token

__all__ = [
    "DEVELOPMENT_PRINCIPAL",
    "KNOWN_SCOPES",
    "SECURITY_SCHEME",
    "SECURITY_SCHEME_NAME",
    "SESSIONS_READ",
    "SESSIONS_WRITE",
    "ApiKeyIntrospector",
    "Principal",
    "authenticate",
    "current_principal",
    "decode_user_token",
    "looks_like_jwt",
    "mint_user_token",
    "require_scope",
    "warn_if_auth_disabled",
]
