"""Fixtures for the credential broker: a GitHub App stand-in and its git host.

`git_host` starts, for one test, the GitHub App API stand-in and the git
smart-HTTP server on 127.0.0.1 over TLS, sharing one token ledger, with this
world in it:

| repository   | visibility | installation                              |
|--------------|------------|-------------------------------------------|
| acme/app     | private    | 42 (acme)                                 |
| acme/other   | private    | 42 (acme)                                 |
| beta/secret  | private    | 77 (beta)                                 |
| frozen/vault | private    | 99 (frozen), suspended                    |
| narrow/lib   | private    | 55 (narrow), granted metadata only        |
| octo/hello   | public     | none                                      |

and `ENTITLEMENTS`: org_a owns everything of acme, org_b whatever installation
77 covers, org_c a few single repositories (one of them missing); octo/hello
is public. The repositories themselves are made once per test run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from enclave.broker import CredentialBroker
from enclave.broker.entitlements import Entitlements
from enclave.broker.github import GitHubAppProvider
from tests.github_app import GitHubStandIn, generate_app_key
from tests.gitserver import (
    GitHostError,
    GitHTTPApp,
    HTTPSServer,
    SampleRepository,
    TLSFiles,
    create_repository,
    make_tls_files,
    require_git,
)

APP_ID = "31337"
REPOSITORIES = (
    "acme/app",
    "acme/other",
    "beta/secret",
    "frozen/vault",
    "narrow/lib",
    "octo/hello",
)
ENTITLEMENTS = {
    "orgs": {
        "org_a": {"owners": ["acme"]},
        "org_b": {"installations": [77]},
        "org_c": {"repositories": ["frozen/vault", "narrow/lib", "acme/missing"]},
    },
    "public": {"repositories": ["octo/hello"]},
}


@dataclass
class GitHost:
    github: GitHubStandIn
    git: GitHTTPApp
    git_server: HTTPSServer
    api_server: HTTPSServer
    tls: TLSFiles
    repositories: dict[str, SampleRepository]
    private_key: str

    @property
    def host(self) -> str:
        return self.git_server.host

    @property
    def api_url(self) -> str:
        return self.api_server.url

    def url(self, full_name: str) -> str:
        return f"{self.git_server.url}/{full_name}.git"

    def provider(self, **overrides) -> GitHubAppProvider:
        options = {
            "app_id": APP_ID,
            "private_key": self.private_key,
            "api_url": self.api_url,
            "host": self.host,
            "timeout_s": 5.0,
            "ca_bundle": str(self.tls.ca),
        }
        options.update(overrides)
        return GitHubAppProvider(**options)

    def broker(self, entitlements: dict | None = None, **overrides) -> CredentialBroker:
        document = ENTITLEMENTS if entitlements is None else entitlements
        parsed = Entitlements.parse(document, default_host=self.host, source="test")
        provider = self.provider(**overrides)
        return CredentialBroker(entitlements=parsed, providers={self.host: provider})

    def stop(self) -> None:
        self.git_server.stop()
        self.api_server.stop()


def _fail_without_git() -> None:
    try:
        require_git()
    except GitHostError as exc:
        problem = str(exc)
    else:
        return
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def app_key() -> tuple[str, str]:
    return generate_app_key()


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def repositories(tmp_path_factory) -> dict[str, SampleRepository]:
    _fail_without_git()
    root = tmp_path_factory.mktemp("repositories")
    return {name: create_repository(root, *name.split("/")) for name in REPOSITORIES}


def start_git_host(
    app_key, tls, repositories, *, allow_sha_wants: bool = True
) -> GitHost:
    private_key, public_key = app_key
    github = GitHubStandIn(app_id=APP_ID, public_key=public_key)
    for name in REPOSITORIES:
        github.add_repository(*name.split("/"), private=name != "octo/hello")
    github.install(42, "acme", ["acme/app", "acme/other"])
    github.install(77, "beta", ["beta/secret"])
    github.install(99, "frozen", ["frozen/vault"], suspended=True)
    github.install(55, "narrow", ["narrow/lib"], permissions={"metadata": "read"})

    root = Path(next(iter(repositories.values())).path).parents[1]
    git = GitHTTPApp(root, github.authorize_git, allow_sha_wants=allow_sha_wants)
    git_server = HTTPSServer(git, tls).start()
    api_server = HTTPSServer(github.api_app(), tls).start()
    return GitHost(
        github=github,
        git=git,
        git_server=git_server,
        api_server=api_server,
        tls=tls,
        repositories=repositories,
        private_key=private_key,
    )


@pytest.fixture
def git_host(app_key, tls, repositories):
    host = start_git_host(app_key, tls, repositories)
    yield host
    host.github.stop()
    host.stop()


@pytest.fixture
def strict_git_host(app_key, tls, repositories):
    """A git host that, like some, will not serve a commit by its id."""
    host = start_git_host(app_key, tls, repositories, allow_sha_wants=False)
    yield host
    host.github.stop()
    host.stop()
