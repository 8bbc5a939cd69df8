"""The GitHub App provider: installation tokens for one repository at a time.

The deployment registers a GitHub App and keeps its id and private key. For
each clone the provider

1. signs a short app JWT (RS256) with the private key,
2. asks which installation of the app covers the repository
   (`GET /repos/{owner}/{repo}/installation`),
3. mints an installation token restricted to that one repository with
   `contents: read` (`POST /app/installations/{id}/access_tokens`), and checks
   that GitHub granted no more than that,
4. revokes the token as soon as the clone is over (`DELETE /installation/token`,
   authenticated by the token itself).

The API base URL is a setting, so the same code serves github.com
(`https://api.github.com`), a GitHub Enterprise Server (`https://HOST/api/v3`)
and the test suite's stand-in. Every HTTP failure becomes one of the broker's
errors with a message of our own: GitHub's response bodies are never passed on,
and neither the JWT nor the token ever appears in a message or a log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave.broker.errors import (
    InstallationDenied,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    RepositoryNotFound,
)
from enclave.broker.provider import GitCredential, fingerprint
from enclave.broker.repository import GitRepository
from enclave.errors import ConfigurationError
from enclave.models import utcnow

logger = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
TOKEN_USERNAME = "x-access-token"
REQUESTED_PERMISSIONS = {"contents": "read"}
# GitHub adds read access to metadata to every installation token; it reveals
# nothing the token's one repository does not already show.
TOLERATED_PERMISSIONS = {"contents": "read", "metadata": "read"}
# GitHub refuses app JWTs that live longer than ten minutes; the issue time is
# set back a minute to allow for a clock that runs ahead of GitHub's.
JWT_LIFETIME_S = 9 * 60
JWT_BACKDATE_S = 60
DEFAULT_RETRY_AFTER_S = 60


class GitHubAppProvider:
    """Mints and revokes repository-scoped installation tokens of one GitHub App."""

    name = "github_app"

    def __init__(
        self,
        *,
        app_id: str,
        private_key: str,
        api_url: str = "https://api.github.com",
        host: str = "github.com",
        timeout_s: float = 10.0,
        ca_bundle: str | None = None,
    ) -> None:
        if not str(app_id).strip():
            raise ConfigurationError("the GitHub App id is empty")
        self.app_id = str(app_id).strip()
        self.host = host.lower()
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self._api_host = urlsplit(self.api_url).netloc or self.api_url
        self._private_key = _load_private_key(private_key)
        self._http = requests.Session()
        self._http.headers.update(
            {
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "enclave-credential-broker",
            }
        )
        # Passed with each request: a session's own `verify` loses to
        # REQUESTS_CA_BUNDLE in the environment.
        self._verify: str | bool = ca_bundle or True

    def __repr__(self) -> str:
        return f"GitHubAppProvider(app_id={self.app_id!r}, api_url={self.api_url!r})"

    # -- the provider interface ----------------------------------------------------

    def installation_for(self, repository: GitRepository) -> int:
        response = self._call(
            "GET",
            f"/repos/{repository.owner}/{repository.name}/installation",
            authorization=f"Bearer {self._app_jwt()}",
            doing=f"looking up the installation for {repository}",
        )
        if response.status_code == 404:
            raise RepositoryNotFound(
                f"The repository {repository} does not exist, or the GitHub App "
                "is not installed on it."
            )
        self._raise_for_app_errors(response, f"looking up {repository}")
        body = _json_object(response, f"the installation of {repository}")
        installation_id = body.get("id")
        if not isinstance(installation_id, int) or isinstance(installation_id, bool):
            raise ProviderProtocolError(
                f"GitHub's answer for the installation of {repository} has no id."
            )
        return installation_id

    def issue(
        self, repository: GitRepository, *, installation_id: int
    ) -> GitCredential:
        issued_at = utcnow()
        response = self._call(
            "POST",
            f"/app/installations/{int(installation_id)}/access_tokens",
            authorization=f"Bearer {self._app_jwt()}",
            json={
                "repositories": [repository.name],
                "permissions": REQUESTED_PERMISSIONS,
            },
            doing=f"minting a token for {repository}",
        )
        if response.status_code == 404:
            raise InstallationDenied(
                f"The GitHub App installation {installation_id} for {repository} "
                "was not found; the app may have been uninstalled."
            )
        if response.status_code == 403:
            raise InstallationDenied(
                f"The GitHub App installation {installation_id} refused a token for "
                f"{repository}; the installation may be suspended."
            )
        if response.status_code == 422:
            raise InstallationDenied(
                f"The GitHub App installation {installation_id} cannot grant read "
                f"access to {repository}: the repository is not among its "
                "repositories, or the app lacks the contents permission."
            )
        self._raise_for_app_errors(response, f"minting a token for {repository}")
        if response.status_code != 201:
            raise ProviderProtocolError(
                f"GitHub answered {response.status_code} while minting a token "
                f"for {repository}."
            )

        body = _json_object(response, f"the token for {repository}")
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ProviderProtocolError(
                f"GitHub's answer for a token for {repository} holds no token."
            )
        credential = GitCredential(
            repository=repository,
            token=token,
            username=TOKEN_USERNAME,
            permissions=tuple(sorted(REQUESTED_PERMISSIONS.items())),
            issued_at=issued_at,
            expires_at=_expiry(body.get("expires_at")),
            provider=self.name,
            installation_id=installation_id,
        )
        problem = _broader_than_requested(body, repository)
        if problem:
            # Never let a token out that can do more than read this one
            # repository, even if GitHub granted it.
            self._revoke_quietly(credential)
            raise ProviderProtocolError(
                f"GitHub granted a token for {repository} with {problem}; "
                "it was revoked unused."
            )
        return credential

    def revoke(self, credential: GitCredential) -> None:
        response = self._call(
            "DELETE",
            "/installation/token",
            authorization=f"Bearer {credential.token}",
            doing=f"revoking a token for {credential.repository}",
        )
        # 401: the token is already expired or revoked, which is what we want.
        if response.status_code in (204, 401):
            return
        self._raise_for_app_errors(response, "revoking a token")
        raise ProviderProtocolError(
            f"GitHub answered {response.status_code} while revoking a token "
            f"for {credential.repository}."
        )

    # -- inner steps --------------------------------------------------------------

    def _app_jwt(self) -> str:
        now = int(time.time())
        return jwt.encode(
            {
                "iat": now - JWT_BACKDATE_S,
                "exp": now + JWT_LIFETIME_S,
                "iss": self.app_id,
            },
            self._private_key,
            algorithm="RS256",
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        authorization: str,
        doing: str,
        json: dict[str, Any] | None = None,
    ) -> requests.Response:
        started = time.monotonic()
        try:
            response = self._http.request(
                method,
                self.api_url + path,
                headers={"Authorization": authorization},
                json=json,
                timeout=self.timeout_s,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise ProviderUnavailable(
                f"The GitHub API at {self._api_host} did not answer within "
                f"{self.timeout_s:g}s while {doing}."
            ) from exc
        except requests.RequestException as exc:
            raise ProviderUnavailable(
                f"The GitHub API at {self._api_host} could not be reached while "
                f"{doing}."
            ) from exc
        logger.debug(
            "github api method=%s path=%s status=%s duration_ms=%d",
            method,
            path,
            response.status_code,
            (time.monotonic() - started) * 1000,
        )

        retry_after = _rate_limit_wait(response)
        if retry_after is not None:
            raise ProviderRateLimited(
                f"The GitHub API rate limit was hit while {doing}; "
                f"retry in {retry_after}s.",
                retry_after_s=retry_after,
            )
        if response.status_code >= 500:
            raise ProviderUnavailable(
                f"The GitHub API at {self._api_host} failed "
                f"({response.status_code}) while {doing}."
            )
        return response

    def _raise_for_app_errors(self, response: requests.Response, doing: str) -> None:
        if response.status_code == 401:
            raise ProviderRejected(
                f"GitHub refused the app's credentials while {doing}; check the "
                "GitHub App id and private key of this deployment."
            )
        if response.status_code not in (200, 201):
            raise ProviderProtocolError(
                f"GitHub answered {response.status_code} while {doing}."
            )

    def _revoke_quietly(self, credential: GitCredential) -> None:
        try:
            self.revoke(credential)
        except (ProviderUnavailable, ProviderProtocolError, ProviderRejected):
            # Reporting the broad grant matters more than this revocation's
            # failure; the token still expires on GitHub's own schedule.
            logger.warning(
                "could not revoke an over-broad token fingerprint=%s repository=%s",
                credential.fingerprint,
                credential.repository,
            )


def _load_private_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            "the GitHub App private key is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError("the GitHub App private key must be an RSA key")
    return key


def _json_object(response: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProviderProtocolError(f"GitHub's answer for {what} is not a JSON object.")
    return body


def _expiry(value: Any) -> dt.datetime:
    try:
        expires = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise ProviderProtocolError(
            "GitHub's token answer has no valid expires_at."
        ) from None
    if expires.tzinfo is not None:
        expires = expires.astimezone(dt.UTC).replace(tzinfo=None)
    return expires


def _broader_than_requested(body: dict[str, Any], repository: GitRepository) -> str:
    """Why a minted token can do more than requested, or "" when it cannot."""
    permissions = body.get("permissions")
    if not isinstance(permissions, dict) or permissions.get("contents") != "read":
        return "permissions other than contents: read"
    extra = {k: v for k, v in permissions.items() if TOLERATED_PERMISSIONS.get(k) != v}
    if extra:
        return f"extra permissions ({', '.join(sorted(extra))})"
    if body.get("repository_selection") not in (None, "selected"):
        return "access to all of the installation's repositories"
    repositories = body.get("repositories")
    names = [
        r.get("name", "").lower() if isinstance(r, dict) else ""
        for r in repositories or ()
    ]
    if names != [repository.name.lower()]:
        return "access to repositories other than the one requested"
    return ""


def _rate_limit_wait(response: requests.Response) -> int | None:
    """Seconds to wait when GitHub says a rate limit was hit, else None."""
    if response.status_code not in (403, 429):
        return None
    retry_after = response.headers.get("Retry-After")
    if retry_after is not None:
        try:
            return max(1, int(retry_after))
        except ValueError:
            return DEFAULT_RETRY_AFTER_S
    if response.headers.get("X-RateLimit-Remaining") == "0":
        try:
            reset = int(response.headers.get("X-RateLimit-Reset", ""))
        except ValueError:
            return DEFAULT_RETRY_AFTER_S
        return max(1, reset - int(time.time()))
    if response.status_code == 429:
        return DEFAULT_RETRY_AFTER_S
    return None


__all__ = ["TOKEN_USERNAME", "GitHubAppProvider", "fingerprint"]
