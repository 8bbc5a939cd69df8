"""The credential broker end to end: settings, issue, revoke, the ttl, the logs."""

from __future__ import annotations

import json
import logging
import time

import pytest

from enclave.broker import (
    CredentialBroker,
    GitSourceRefused,
    InstallationDenied,
    RepositoryNotFound,
)
from enclave.config import Settings
from enclave.errors import ConfigurationError
from tests.broker.conftest import APP_ID, ENTITLEMENTS


def _settings(git_host, tmp_path, **extra) -> Settings:
    key_file = tmp_path / "app.pem"
    key_file.write_text(git_host.private_key)
    environ = {
        "ENCLAVE_ENV": "test",
        "ENCLAVE_AUTH_DISABLED": "1",
        "ENCLAVE_GITHUB_APP_ID": APP_ID,
        "ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE": str(key_file),
        "ENCLAVE_GITHUB_API_URL": git_host.api_url,
        "ENCLAVE_GITHUB_HOST": git_host.host,
        "ENCLAVE_GITHUB_API_TIMEOUT_S": "4.5",
        "ENCLAVE_GIT_CA_BUNDLE": str(git_host.tls.ca),
        "ENCLAVE_GIT_ENTITLEMENTS": json.dumps(ENTITLEMENTS),
    }
    environ.update(extra)
    return Settings.load({k: v for k, v in environ.items() if v is not None})


def test_broker_from_settings_reads_every_enclave_variable(git_host, tmp_path):
    settings = _settings(git_host, tmp_path)
    broker = CredentialBroker.from_settings(settings)

    (provider,) = broker.providers.values()
    assert settings.github_api_timeout_s == 4.5
    assert provider.host == git_host.host
    assert provider.timeout_s == 4.5
    assert broker.enabled
    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=60
    )
    assert git_host.github.token_usable(credential.token)
    broker.revoke_git_token(credential)


def test_broker_from_settings_accepts_a_key_with_escaped_newlines(git_host, tmp_path):
    escaped = git_host.private_key.strip().replace("\n", "\\n")
    settings = _settings(
        git_host,
        tmp_path,
        ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE=None,
        ENCLAVE_GITHUB_APP_PRIVATE_KEY=escaped,
    )

    broker = CredentialBroker.from_settings(settings)

    assert broker.check_entitlement("org_b", git_host.url("beta/secret"))
    assert escaped not in repr(settings)


def test_broker_from_settings_without_an_app_still_serves_public_sources(tmp_path):
    settings = Settings.load(
        {
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_GIT_ENTITLEMENTS": json.dumps(
                {"public": {"repositories": ["octocat/hello-world"]}}
            ),
        }
    )

    broker = CredentialBroker.from_settings(settings)

    assert broker.providers == {}
    entitlement = broker.check_entitlement(
        "org_a", "https://github.com/octocat/hello-world"
    )
    assert not entitlement.needs_token


def test_broker_from_settings_is_disabled_without_entitlements():
    broker = CredentialBroker.from_settings(
        Settings.load({"ENCLAVE_AUTH_DISABLED": "1"})
    )

    assert not broker.enabled
    with pytest.raises(GitSourceRefused):
        broker.check_entitlement("org_a", "https://github.com/acme/app")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE": None}, "needs both"),
        ({"ENCLAVE_GITHUB_APP_ID": None}, "needs both"),
        ({"ENCLAVE_GITHUB_APP_PRIVATE_KEY": "x"}, "not both"),
        (
            {"ENCLAVE_GITHUB_APP_PRIVATE_KEY_FILE": "/nonexistent/key.pem"},
            "cannot be read",
        ),
        ({"ENCLAVE_GIT_ENTITLEMENTS": "[1, 2]"}, "expected a JSON object"),
    ],
)
def test_broker_from_settings_refuses_an_incomplete_app(
    git_host, tmp_path, changes, problem
):
    settings = _settings(git_host, tmp_path, **changes)

    with pytest.raises(ConfigurationError, match=problem):
        CredentialBroker.from_settings(settings)


def test_broker_refuses_grants_on_a_host_no_app_serves(git_host, tmp_path):
    settings = _settings(
        git_host,
        tmp_path,
        ENCLAVE_GIT_ENTITLEMENTS=json.dumps(
            {"orgs": {"org_a": {"repositories": ["gitlab.example.com/a/b"]}}}
        ),
    )

    with pytest.raises(ConfigurationError, match="gitlab.example.com"):
        CredentialBroker.from_settings(settings)


def test_issue_git_token_for_a_public_repository_mints_nothing(git_host):
    broker = git_host.broker()

    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("octo/hello"), ttl_seconds=60
    )

    assert credential is None
    assert git_host.github.minted == []


def test_issue_git_token_for_an_entitled_repository(git_host):
    broker = git_host.broker()

    credential = broker.issue_git_token(
        "ses_1", "org_b", git_host.url("beta/secret"), ttl_seconds=60
    )

    (grant,) = git_host.github.minted
    assert grant.token == credential.token
    assert grant.repositories == {"beta/secret"}
    assert credential.installation_id == 77
    broker.revoke_git_token(credential)


def test_issue_git_token_refused_org_gets_no_token(git_host):
    broker = git_host.broker()

    with pytest.raises(GitSourceRefused):
        broker.issue_git_token(
            "ses_1", "org_b", git_host.url("acme/app"), ttl_seconds=60
        )

    assert git_host.github.minted == []
    assert not any(
        call[1].endswith("/access_tokens") for call in git_host.github.api_calls
    )


def test_issue_git_token_checks_the_entitlement_again(git_host):
    """A grant withdrawn after the session was accepted mints nothing."""
    before = git_host.broker()
    before.check_entitlement("org_a", git_host.url("acme/app"))
    after = git_host.broker({"orgs": {"org_a": {"owners": ["beta"]}}})

    with pytest.raises(GitSourceRefused):
        after.issue_git_token(
            "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=60
        )

    assert git_host.github.minted == []


def test_issue_git_token_reports_a_missing_repository(git_host):
    with pytest.raises(RepositoryNotFound, match="acme/missing does not exist"):
        git_host.broker().issue_git_token(
            "ses_1", "org_c", git_host.url("acme/missing"), ttl_seconds=60
        )


def test_issue_git_token_reports_a_denied_installation(git_host):
    with pytest.raises(InstallationDenied, match="suspended"):
        git_host.broker().issue_git_token(
            "ses_1", "org_c", git_host.url("frozen/vault"), ttl_seconds=60
        )


def test_revoke_git_token_makes_the_token_useless(git_host):
    broker = git_host.broker()
    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=60
    )

    assert broker.revoke_git_token(credential) is True

    assert not git_host.github.token_usable(credential.token)
    assert (
        git_host.github.authorize_git("acme/app", "x-access-token", credential.token)
        == 401
    )


def test_revoke_git_token_reports_failure_without_raising(git_host, caplog):
    broker = git_host.broker()
    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=60
    )
    git_host.github.fail_status = 503

    with caplog.at_level(logging.WARNING, logger="enclave.broker"):
        assert broker.revoke_git_token(credential) is False

    assert "credential not revoked" in caplog.text
    assert credential.fingerprint in caplog.text
    assert credential.token not in caplog.text
    git_host.github.fail_status = None
    assert broker.revoke_git_token(credential) is True


def test_issue_git_token_revokes_by_itself_after_the_ttl(git_host):
    broker = git_host.broker()
    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=0.5
    )
    assert git_host.github.token_usable(credential.token)

    deadline = time.monotonic() + 5
    while git_host.github.token_usable(credential.token):
        assert time.monotonic() < deadline, "the token outlived its ttl"
        time.sleep(0.1)


def test_broker_close_revokes_what_is_still_alive(git_host):
    broker = git_host.broker()
    credential = broker.issue_git_token(
        "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=600
    )

    broker.close()

    assert not git_host.github.token_usable(credential.token)


def test_broker_never_logs_the_token(git_host, caplog):
    broker = git_host.broker()

    with caplog.at_level(logging.DEBUG):
        credential = broker.issue_git_token(
            "ses_1", "org_a", git_host.url("acme/app"), ttl_seconds=60
        )
        broker.revoke_git_token(credential)
        git_host.github.fail_status = 503
        broker.revoke_git_token(credential)

    lines = [record.getMessage() for record in caplog.records]
    assert any("credential issued" in line for line in lines)
    assert any("credential revoked" in line for line in lines)
    assert all(credential.token not in line for line in lines)
    assert credential.token not in caplog.text
