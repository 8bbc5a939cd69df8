"""Which repositories each organisation may clone: the deployment's entitlements.

The operator writes them as JSON, in a file named by
`ENCLAVE_GIT_ENTITLEMENTS_FILE`, in `ENCLAVE_GIT_ENTITLEMENTS` itself, or both
(their grants add up):

    {
      "orgs": {
        "org_acme": {
          "owners": ["acme"],
          "repositories": ["partner/shared-lib", "ghe.example.com/acme/tools"],
          "installations": [4242]
        }
      },
      "public": {
        "repositories": ["octocat/hello-world"],
        "owners": ["python"],
        "hosts": ["codeberg.org"]
      }
    }

An org's `owners` entitle it to every repository of those accounts,
`repositories` to single ones, and `installations` to every repository the
GitHub App installation with that id can read (this one costs an API call to
check). Those clone with a token. `public` lists what any org may clone
without a token: single repositories, whole accounts, or every repository of a
host (a private repository then simply fails to clone, as for anyone without
credentials). A name without a host is on the GitHub App's host
(`ENCLAVE_GITHUB_HOST`, `github.com` by default); an installation written
`"host/1234"` belongs to the app on that host. Names compare case-blind, as git
hosts treat them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclave.broker.repository import GitRepository, parse_repository_name
from enclave.errors import ConfigurationError, EnclaveError

logger = logging.getLogger(__name__)

ORG_KEYS = frozenset({"owners", "repositories", "installations"})
PUBLIC_KEYS = frozenset({"owners", "repositories", "hosts"})
TOP_KEYS = frozenset({"orgs", "public"})


@dataclass(frozen=True)
class OrgGrants:
    """What one organisation may clone with a token."""

    owners: frozenset[str] = frozenset()
    repositories: frozenset[str] = frozenset()
    installations: frozenset[tuple[str, int]] = frozenset()

    def merged(self, other: OrgGrants) -> OrgGrants:
        return OrgGrants(
            owners=self.owners | other.owners,
            repositories=self.repositories | other.repositories,
            installations=self.installations | other.installations,
        )

    def hosts(self) -> set[str]:
        names = self.owners | self.repositories
        return {name.split("/", 1)[0] for name in names} | {
            host for host, _ in self.installations
        }


@dataclass(frozen=True)
class PublicRules:
    """What any organisation may clone without a token."""

    owners: frozenset[str] = frozenset()
    repositories: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()

    def merged(self, other: PublicRules) -> PublicRules:
        return PublicRules(
            owners=self.owners | other.owners,
            repositories=self.repositories | other.repositories,
            hosts=self.hosts | other.hosts,
        )


@dataclass(frozen=True)
class Entitlements:
    orgs: dict[str, OrgGrants] = field(default_factory=dict)
    public: PublicRules = field(default_factory=PublicRules)

    @property
    def empty(self) -> bool:
        return not self.orgs and self.public == PublicRules()

    def static_grant(self, org_id: str, repository: GitRepository) -> str | None:
        """`"repository"` or `"owner"` when a named grant covers the repository."""
        grants = self.orgs.get(org_id)
        if grants is None:
            return None
        if repository.key in grants.repositories:
            return "repository"
        if _owner_key(repository) in grants.owners:
            return "owner"
        return None

    def installations(self, org_id: str, host: str) -> frozenset[int]:
        grants = self.orgs.get(org_id)
        if grants is None:
            return frozenset()
        return frozenset(i for h, i in grants.installations if h == host.lower())

    def named_public(self, repository: GitRepository) -> bool:
        """Listed as public by name or by owner."""
        return (
            repository.key in self.public.repositories
            or _owner_key(repository) in self.public.owners
        )

    def public_host(self, repository: GitRepository) -> bool:
        return repository.host.lower() in self.public.hosts

    def private_hosts(self) -> set[str]:
        """Every host some org is granted repositories on (each needs a provider)."""
        hosts: set[str] = set()
        for grants in self.orgs.values():
            hosts |= grants.hosts()
        return hosts

    @classmethod
    def parse(cls, document: Any, *, default_host: str, source: str) -> Entitlements:
        """Entitlements from one decoded JSON document; `source` names it in errors."""
        if not isinstance(document, dict):
            raise ConfigurationError(f"{source}: expected a JSON object")
        default_host = _host(default_host, "the GitHub App's host")
        _refuse_unknown(document, TOP_KEYS, source)
        orgs_doc = document.get("orgs", {})
        if not isinstance(orgs_doc, dict):
            raise ConfigurationError(f"{source}: 'orgs' must be an object")

        orgs = {}
        for org_id, grants_doc in orgs_doc.items():
            where = f"{source}: orgs.{org_id}"
            if not isinstance(grants_doc, dict):
                raise ConfigurationError(f"{where} must be an object")
            _refuse_unknown(grants_doc, ORG_KEYS, where)
            orgs[org_id] = OrgGrants(
                owners=_owners(grants_doc, default_host, where),
                repositories=_repositories(grants_doc, default_host, where),
                installations=_installations(grants_doc, default_host, where),
            )

        public_doc = document.get("public", {})
        if not isinstance(public_doc, dict):
            raise ConfigurationError(f"{source}: 'public' must be an object")
        _refuse_unknown(public_doc, PUBLIC_KEYS, f"{source}: public")
        public = PublicRules(
            owners=_owners(public_doc, default_host, f"{source}: public"),
            repositories=_repositories(public_doc, default_host, f"{source}: public"),
            hosts=frozenset(
                _host(h, f"{source}: public.hosts")
                for h in _strings(public_doc, "hosts", f"{source}: public")
            ),
        )
        return cls(orgs=orgs, public=public)

    def merged(self, other: Entitlements) -> Entitlements:
        orgs = dict(self.orgs)
        for org_id, grants in other.orgs.items():
            orgs[org_id] = orgs[org_id].merged(grants) if org_id in orgs else grants
        return Entitlements(orgs=orgs, public=self.public.merged(other.public))


def load_entitlements(
    *, text: str | None, path: str | None, default_host: str
) -> Entitlements:
    """The entitlements of `ENCLAVE_GIT_ENTITLEMENTS` and its file, combined."""
    documents: list[tuple[str, str]] = []
    if path:
        try:
            documents.append((path, Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigurationError(
                f"ENCLAVE_GIT_ENTITLEMENTS_FILE {path!r} cannot be read: {exc.strerror}"
            ) from None
    if text:
        documents.append(("ENCLAVE_GIT_ENTITLEMENTS", text))

    entitlements = Entitlements()
    for source, raw in documents:
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise ConfigurationError(f"{source} is not valid JSON: {exc}") from None
        entitlements = entitlements.merged(
            Entitlements.parse(document, default_host=default_host, source=source)
        )
    logger.info(
        "git entitlements loaded orgs=%d public_repositories=%d public_owners=%d "
        "public_hosts=%d",
        len(entitlements.orgs),
        len(entitlements.public.repositories),
        len(entitlements.public.owners),
        len(entitlements.public.hosts),
    )
    return entitlements


def _owner_key(repository: GitRepository) -> str:
    return f"{repository.host}/{repository.owner}".lower()


def _refuse_unknown(document: dict, known: Iterable[str], where: str) -> None:
    unknown = sorted(set(document) - set(known))
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {unknown}")


def _strings(document: dict, key: str, where: str) -> list[str]:
    values = document.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigurationError(f"{where}.{key} must be a list of strings")
    return values


def _host(value: str, where: str) -> str:
    # Parsing a throwaway repository URL applies the URL rules to the host.
    repository = _repository(f"{value}/x/x", where, "")
    return repository.host


def _repository(entry: str, where: str, default_host: str) -> GitRepository:
    try:
        return parse_repository_name(entry, default_host)
    except (ValueError, EnclaveError):
        raise ConfigurationError(f"{where}: {entry!r} is not a valid name") from None


def _owners(document: dict, default_host: str, where: str) -> frozenset[str]:
    owners = set()
    for entry in _strings(document, "owners", where):
        name = entry if "/" in entry else f"{default_host}/{entry}"
        owners.add(_owner_key(_repository(f"{name}/x", f"{where}.owners", "")))
    return frozenset(owners)


def _repositories(document: dict, default_host: str, where: str) -> frozenset[str]:
    return frozenset(
        _repository(entry, f"{where}.repositories", default_host).key
        for entry in _strings(document, "repositories", where)
    )


def _installations(
    document: dict, default_host: str, where: str
) -> frozenset[tuple[str, int]]:
    values = document.get("installations", [])
    if not isinstance(values, list):
        raise ConfigurationError(f"{where}.installations must be a list")
    installations = set()
    for value in values:
        host, number = default_host, value
        if isinstance(value, str) and "/" in value:
            host, _, number = value.rpartition("/")
            host = _host(host, f"{where}.installations")
        problem = ConfigurationError(
            f"{where}.installations: {value!r} is not an installation id"
        )
        if isinstance(number, bool) or not isinstance(number, (int, str)):
            raise problem
        try:
            installation_id = int(number)
        except ValueError:
            raise problem from None
        installations.add((host.lower(), installation_id))
    return frozenset(installations)
