"""The GitHub App provider against the stand-in: real endpoints, real JWTs, real git."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import requests

from enclave.broker import (
    InstallationDenied,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    RepositoryNotFound,
    parse_git_url,
)
from enclave.broker.github import GitHubAppProvider
from enclave.errors import ConfigurationError
from tests.github_app import generate_app_key


def _repository(git_host, full_name):
    return parse_git_url(git_host.url(full_name))


def _git_status(git_host, full_name: str, token: str) -> int:
    """What the git host answers a clone's first request made with `token`."""
    response = requests.get(
        f"{git_host.url(full_name)}/info/refs",
        params={"service": "git-upload-pack"},
        auth=("x-access-token", token),
        verify=str(git_host.tls.ca),
        timeout=10,
    )
    return response.status_code


def _mint(git_host, provider, full_name="acme/app"):
    repository = _repository(git_host, full_name)
    installation_id = provider.installation_for(repository)
    return provider.issue(repository, installation_id=installation_id)


def test_github_app_provider_finds_the_installation_of_a_repository(git_host):
    provider = git_host.provider()

    assert provider.installation_for(_repository(git_host, "acme/app")) == 42
    assert provider.installation_for(_repository(git_host, "beta/secret")) == 77


def test_github_app_provider_mints_a_token_for_one_repository_read_only(git_host):
    credential = _mint(git_host, git_host.provider())

    (grant,) = git_host.github.minted
    assert grant.token == credential.token
    assert grant.installation_id == 42
    assert grant.repositories == {"acme/app"}
    assert grant.permissions == {"contents": "read", "metadata": "read"}
    assert dict(credential.permissions) == {"contents": "read"}
    assert credential.username == "x-access-token"
    assert _git_status(git_host, "acme/app", credential.token) == 200
    # The same installation covers acme/other, but this token does not.
    assert _git_status(git_host, "acme/other", credential.token) == 404


def test_github_app_provider_credential_keeps_the_token_out_of_repr_and_audit(
    git_host,
):
    credential = _mint(git_host, git_host.provider())
    detail = credential.audit_detail()

    assert credential.token not in repr(credential)
    assert credential.token not in str(detail)
    assert (
        detail["fingerprint"]
        == hashlib.sha256(credential.token.encode()).hexdigest()[:12]
    )
    assert detail["repository"] == f"{git_host.host}/acme/app"
    assert detail["permissions"] == {"contents": "read"}
    assert detail["installation_id"] == 42
    assert detail["expires_at"].endswith("Z")


def test_github_app_provider_reports_the_hosts_expiry(git_host):
    git_host.github.token_lifetime_s = 3600
    credential = _mint(git_host, git_host.provider())

    lifetime = (credential.expires_at - credential.issued_at).total_seconds()
    assert 3590 <= lifetime <= 3600


def test_github_app_provider_revocation_makes_the_git_host_refuse_the_token(
    git_host,
):
    provider = git_host.provider()
    credential = _mint(git_host, provider)
    assert _git_status(git_host, "acme/app", credential.token) == 200

    provider.revoke(credential)

    assert _git_status(git_host, "acme/app", credential.token) == 401
    assert ("DELETE", "/installation/token", 204) in git_host.github.api_calls


def test_github_app_provider_revoking_a_dead_token_is_not_an_error(git_host):
    provider = git_host.provider()
    credential = _mint(git_host, provider)
    provider.revoke(credential)

    provider.revoke(credential)

    assert ("DELETE", "/installation/token", 401) in git_host.github.api_calls


def test_github_app_provider_token_stops_working_when_it_expires(git_host):
    git_host.github.token_lifetime_s = 1.5
    credential = _mint(git_host, git_host.provider())
    assert _git_status(git_host, "acme/app", credential.token) == 200

    time.sleep(2)

    assert _git_status(git_host, "acme/app", credential.token) == 401


def test_github_app_provider_jwt_signed_by_another_key_is_refused(git_host):
    other_key, _ = generate_app_key()
    provider = git_host.provider(private_key=other_key)

    with pytest.raises(ProviderRejected, match="app's credentials"):
        provider.installation_for(_repository(git_host, "acme/app"))

    assert git_host.github.api_calls[-1][2] == 401
    assert git_host.github.minted == []


def test_github_app_provider_jwt_of_another_app_id_is_refused(git_host):
    provider = git_host.provider(app_id="999")

    with pytest.raises(ProviderRejected):
        provider.installation_for(_repository(git_host, "acme/app"))


def test_github_app_provider_missing_repository_is_reported_plainly(git_host):
    with pytest.raises(RepositoryNotFound) as caught:
        git_host.provider().installation_for(_repository(git_host, "acme/missing"))

    assert "acme/missing does not exist" in caught.value.message
    assert "not installed" in caught.value.message


def test_github_app_provider_repository_without_the_app_is_reported_plainly(
    git_host,
):
    with pytest.raises(RepositoryNotFound):
        git_host.provider().installation_for(_repository(git_host, "octo/hello"))


def test_github_app_provider_suspended_installation_is_denied(git_host):
    provider = git_host.provider()
    repository = _repository(git_host, "frozen/vault")

    with pytest.raises(InstallationDenied, match="suspended"):
        provider.issue(repository, installation_id=99)

    assert git_host.github.minted == []


def test_github_app_provider_installation_without_contents_is_denied(git_host):
    provider = git_host.provider()
    repository = _repository(git_host, "narrow/lib")

    with pytest.raises(InstallationDenied, match="contents permission"):
        provider.issue(repository, installation_id=55)


def test_github_app_provider_repository_of_another_installation_is_denied(
    git_host,
):
    with pytest.raises(InstallationDenied, match="not among its repositories"):
        git_host.provider().issue(
            _repository(git_host, "beta/secret"), installation_id=42
        )


def test_github_app_provider_unknown_installation_is_denied(git_host):
    with pytest.raises(InstallationDenied, match="not found"):
        git_host.provider().issue(
            _repository(git_host, "acme/app"), installation_id=12345
        )


def test_github_app_provider_rate_limit_says_when_to_retry(git_host):
    git_host.github.rate_limited = True

    with pytest.raises(ProviderRateLimited) as caught:
        _mint(git_host, git_host.provider())

    assert 1 <= caught.value.retry_after_s <= 42
    assert caught.value.headers["Retry-After"] == str(caught.value.retry_after_s)
    assert caught.value.retryable


def test_github_app_provider_server_error_is_unavailable(git_host):
    git_host.github.fail_status = 503

    with pytest.raises(ProviderUnavailable, match=r"failed \(503\)"):
        _mint(git_host, git_host.provider())


def test_github_app_provider_api_down_is_unavailable(git_host):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    provider = git_host.provider(api_url=f"https://127.0.0.1:{closed_port}")

    with pytest.raises(ProviderUnavailable, match="could not be reached"):
        _mint(git_host, provider)


def test_github_app_provider_slow_api_times_out(git_host):
    git_host.github.api_delay_s = 5
    provider = git_host.provider(timeout_s=0.5)
    started = time.monotonic()

    with pytest.raises(ProviderUnavailable, match="did not answer within 0.5s"):
        _mint(git_host, provider)

    assert time.monotonic() - started < 3


def test_github_app_provider_verifies_the_apis_certificate(git_host):
    provider = git_host.provider(ca_bundle=None)

    with pytest.raises(ProviderUnavailable, match="could not be reached"):
        _mint(git_host, provider)


def test_github_app_provider_revokes_a_token_broader_than_asked(git_host):
    git_host.github.over_grant = True

    with pytest.raises(ProviderProtocolError, match="revoked unused") as caught:
        _mint(git_host, git_host.provider())

    (grant,) = git_host.github.minted
    assert grant.revoked
    assert grant.token not in caught.value.message
    assert _git_status(git_host, "acme/app", grant.token) == 401


def test_github_app_provider_refuses_a_key_that_is_not_pem():
    with pytest.raises(ConfigurationError, match="PEM private key"):
        GitHubAppProvider(app_id="1", private_key="not a key")
