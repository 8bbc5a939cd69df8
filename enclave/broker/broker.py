"""The credential broker: who may clone what, and the tokens that let them.

Two callers use it, at two moments of a session:

* the orchestrator, at `POST /sessions`, calls `check_entitlement(org_id, url)`.
  It answers with an `Entitlement` or raises `GitSourceRefused`, a 422 whose
  message is the same whether the repository exists or not, and it never mints
  anything;
* the worker, just before the clone step runs, calls
  `issue_git_token(session_id, org_id, url, ttl_seconds=...)`. It checks the
  entitlement again (the configuration may have changed since the request was
  accepted), and for a repository that needs one it mints a token through the
  host's provider. It returns `None` for a public repository. As soon as the
  clone step is over the worker calls `revoke_git_token(credential)`.

Lifecycle of a token: minted with the narrowest scope the host offers (one
repository, read its contents), alive only in the worker's memory and in the
file the clone step reads, revoked right after the clone. A timer revokes it
after `ttl_seconds` should the worker never get to that, so a hung clone or a
forgotten call does not leave it alive for the host's full lifetime.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from enclave.broker.entitlements import Entitlements, load_entitlements
from enclave.broker.errors import (
    CredentialError,
    GitSourceRefused,
    ProviderUnavailable,
    RepositoryNotFound,
)
from enclave.broker.github import GitHubAppProvider
from enclave.broker.provider import GitCredential, GitProvider
from enclave.broker.repository import GitRepository, parse_git_url
from enclave.errors import ConfigurationError

if TYPE_CHECKING:
    from enclave.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entitlement:
    """Why an organisation may clone a repository, and whether that needs a token.

    `via` is `repository`, `owner` or `installation` (a grant of the org; a
    token is needed) or `public` (no token).
    """

    repository: GitRepository
    via: str
    installation_id: int | None = None

    @property
    def needs_token(self) -> bool:
        return self.via != "public"

    def audit_detail(self) -> dict[str, object]:
        return {
            "repository": str(self.repository),
            "via": self.via,
            "installation_id": self.installation_id,
        }


class CredentialBroker:
    """Entitlement checks and repository-scoped git tokens for every git host."""

    def __init__(
        self,
        *,
        entitlements: Entitlements,
        providers: Mapping[str, GitProvider] | None = None,
    ) -> None:
        self.entitlements = entitlements
        self.providers = {host.lower(): p for host, p in (providers or {}).items()}
        unserved = sorted(entitlements.private_hosts() - set(self.providers))
        if unserved:
            raise ConfigurationError(
                "the git entitlements grant organisations repositories on "
                f"{', '.join(unserved)}, but no GitHub App is configured for it "
                "(set ENCLAVE_GITHUB_APP_ID, a private key and ENCLAVE_GITHUB_HOST)"
            )
        self._armed: dict[str, tuple[threading.Timer, GitCredential]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> CredentialBroker:
        providers: dict[str, GitProvider] = {}
        key = _private_key(settings)
        if settings.github_app_id or key:
            if not (settings.github_app_id and key):
                raise ConfigurationError(
                    "a GitHub App needs both ENCLAVE_GITHUB_APP_ID and a private key "
                    "(ENCLAVE_GITHUB_APP_PRIVATE_KEY or "
                    "ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE)"
                )
            provider = GitHubAppProvider(
                app_id=settings.github_app_id,
                private_key=key,
                api_url=settings.github_api_url,
                host=parse_git_url(f"https://{settings.github_host}/x/x").host,
                timeout_s=settings.github_api_timeout_s,
                ca_bundle=settings.git_ca_bundle,
            )
            providers[provider.host] = provider
        entitlements = load_entitlements(
            text=settings.git_entitlements,
            path=settings.git_entitlements_file,
            default_host=settings.github_host,
        )
        return cls(entitlements=entitlements, providers=providers)

    @property
    def enabled(self) -> bool:
        """Whether this deployment lets any session clone anything."""
        return not self.entitlements.empty

    def check_entitlement(self, org_id: str, url: str) -> Entitlement:
        """The org's entitlement to clone `url`, or `GitSourceRefused` (422).

        Raises `InvalidGitSource` for a malformed URL and `ProviderUnavailable`
        when an installation grant cannot be checked because the host's API is
        down; neither says anything about the repository.
        """
        repository = parse_git_url(url)

        via = self.entitlements.static_grant(org_id, repository)
        if via is not None:
            return Entitlement(repository=repository, via=via)
        if self.entitlements.named_public(repository):
            return Entitlement(repository=repository, via="public")
        installation_id = self._granted_installation(org_id, repository)
        if installation_id is not None:
            return Entitlement(
                repository=repository,
                via="installation",
                installation_id=installation_id,
            )
        if self.entitlements.public_host(repository):
            return Entitlement(repository=repository, via="public")

        logger.info("git source refused org_id=%s repository=%s", org_id, repository)
        raise GitSourceRefused(str(repository), "no grant of the org covers it")

    def issue_git_token(
        self,
        session_id: str,
        org_id: str,
        url: str,
        *,
        ttl_seconds: float,
    ) -> GitCredential | None:
        """A token that can read `url` for about `ttl_seconds`; `None` if public.

        Raises `GitSourceRefused` when the org is (no longer) entitled to the
        repository, and a `CredentialError` or `ProviderUnavailable` when the
        host would not mint one; their messages are fit for the session's
        `error` and hold no secret.
        """
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        entitlement = self.check_entitlement(org_id, url)
        if not entitlement.needs_token:
            logger.info(
                "git source is public session_id=%s repository=%s",
                session_id,
                entitlement.repository,
            )
            return None

        repository = entitlement.repository
        provider = self.providers.get(repository.host)
        if provider is None:
            raise CredentialError(f"No credential provider serves {repository.host}.")
        installation_id = entitlement.installation_id
        if installation_id is None:
            installation_id = provider.installation_for(repository)
        credential = provider.issue(repository, installation_id=installation_id)
        self._arm_revocation(credential, ttl_seconds)
        logger.info(
            "credential issued session_id=%s org_id=%s repository=%s "
            "installation_id=%s fingerprint=%s expires_at=%s",
            session_id,
            org_id,
            repository,
            installation_id,
            credential.fingerprint,
            credential.expires_at.isoformat(),
        )
        return credential

    def revoke_git_token(self, credential: GitCredential) -> bool:
        """Revoke a token now; False (logged) when the host could not be told.

        Never raises: it runs where the session is already ending, and a token
        the host still holds dies at its expiry regardless.
        """
        with self._lock:
            armed = self._armed.pop(credential.fingerprint, None)
        if armed is not None:
            armed[0].cancel()
        provider = self.providers.get(credential.repository.host)
        if provider is None:
            return False
        try:
            provider.revoke(credential)
        except (CredentialError, ProviderUnavailable) as exc:
            logger.warning(
                "credential not revoked fingerprint=%s repository=%s error=%s",
                credential.fingerprint,
                credential.repository,
                exc.message,
            )
            return False
        logger.info(
            "credential revoked fingerprint=%s repository=%s",
            credential.fingerprint,
            credential.repository,
        )
        return True

    def close(self) -> None:
        """Revoke every token still waiting for its timer (a worker shutting down)."""
        with self._lock:
            pending = [credential for _, credential in self._armed.values()]
        for credential in pending:
            self.revoke_git_token(credential)

    # -- inner steps --------------------------------------------------------------

    def _granted_installation(
        self, org_id: str, repository: GitRepository
    ) -> int | None:
        granted = self.entitlements.installations(org_id, repository.host)
        provider = self.providers.get(repository.host)
        if not granted or provider is None:
            return None
        try:
            installation_id = provider.installation_for(repository)
        except RepositoryNotFound:
            # Missing, or not covered by the app: to the caller this must look
            # exactly like a repository of another organisation.
            return None
        return installation_id if installation_id in granted else None

    def _arm_revocation(self, credential: GitCredential, ttl_seconds: float) -> None:
        # TODO: the timer lives in this process only. A worker killed between
        # issue and revoke leaves the token valid until the host's own expiry
        # (an hour on GitHub); the reaper could revoke it only if the token were
        # kept somewhere it can read, which nothing here may do in clear.
        timer = threading.Timer(ttl_seconds, self._expire, args=(credential,))
        timer.daemon = True
        timer.name = f"revoke-{credential.fingerprint}"
        with self._lock:
            self._armed[credential.fingerprint] = (timer, credential)
        timer.start()

    def _expire(self, credential: GitCredential) -> None:
        logger.warning(
            "credential outlived its ttl, revoking fingerprint=%s repository=%s",
            credential.fingerprint,
            credential.repository,
        )
        self.revoke_git_token(credential)


def _private_key(settings: Settings) -> str | None:
    if settings.github_app_private_key and settings.github_app_private_key_file:
        raise ConfigurationError(
            "set ENCLAVE_GITHUB_APP_PRIVATE_KEY or "
            "ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE, not both"
        )
    if settings.github_app_private_key_file:
        try:
            return Path(settings.github_app_private_key_file).read_text()
        except OSError as exc:
            raise ConfigurationError(
                f"ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE cannot be read: {exc.strerror}"
            ) from None
    key = settings.github_app_private_key
    if key and "\n" not in key and "\\n" in key:
        # Some platforms cannot hold newlines in a variable; accept `\n` escapes.
        key = key.replace("\\n", "\n")
    return key or None
