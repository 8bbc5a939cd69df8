"""Entitlements: what each org may clone, and refusals that reveal nothing."""

from __future__ import annotations

import json

import pytest

from enclave.broker import GitSourceRefused, InvalidGitSource, ProviderUnavailable
from enclave.broker.entitlements import Entitlements, load_entitlements
from enclave.errors import ConfigurationError


def _refusal(broker, org_id, url) -> GitSourceRefused:
    with pytest.raises(GitSourceRefused) as caught:
        broker.check_entitlement(org_id, url)
    return caught.value


def test_check_entitlement_grants_an_org_its_own_owner(git_host):
    entitlement = git_host.broker().check_entitlement("org_a", git_host.url("acme/app"))

    assert entitlement.via == "owner"
    assert entitlement.needs_token
    assert str(entitlement.repository) == f"{git_host.host}/acme/app"


def test_check_entitlement_grants_a_named_repository(git_host):
    entitlement = git_host.broker().check_entitlement(
        "org_c", git_host.url("frozen/vault")
    )

    assert entitlement.via == "repository"


def test_check_entitlement_grants_what_an_installation_covers(git_host):
    entitlement = git_host.broker().check_entitlement(
        "org_b", git_host.url("beta/secret")
    )

    assert entitlement.via == "installation"
    assert entitlement.installation_id == 77


def test_check_entitlement_public_repository_needs_no_token(git_host):
    entitlement = git_host.broker().check_entitlement(
        "org_b", git_host.url("octo/hello")
    )

    assert entitlement.via == "public"
    assert not entitlement.needs_token


def test_check_entitlement_compares_names_case_blind(git_host):
    entitlement = git_host.broker().check_entitlement("org_a", git_host.url("ACME/App"))

    assert entitlement.via == "owner"


def test_check_entitlement_refuses_org_b_naming_org_as_repository(git_host):
    broker = git_host.broker()

    by_installation = _refusal(broker, "org_b", git_host.url("acme/app"))
    by_name = _refusal(broker, "org_c", git_host.url("acme/app"))

    assert by_installation.status == 422
    assert by_installation.repository == f"{git_host.host}/acme/app"
    assert by_name.status == 422
    assert git_host.github.minted == []


def test_check_entitlement_refusal_does_not_reveal_whether_it_exists(git_host):
    broker = git_host.broker()

    refusals = [
        _refusal(broker, "org_b", git_host.url("acme/app")),
        _refusal(broker, "org_b", git_host.url("acme/does-not-exist")),
        _refusal(broker, "org_b", git_host.url("nobody/nothing")),
        _refusal(broker, "org_c", git_host.url("acme/app")),
        _refusal(broker, "org_unknown", git_host.url("beta/secret")),
    ]

    bodies = {json.dumps(r.to_dict(), sort_keys=True) for r in refusals}
    assert len(bodies) == 1
    assert "acme" not in bodies.pop()
    assert git_host.github.minted == []


def test_check_entitlement_refuses_a_malformed_url_before_anything_else(git_host):
    with pytest.raises(InvalidGitSource):
        git_host.broker().check_entitlement("org_a", "git@github.com:acme/app.git")

    assert git_host.github.api_calls == []


def test_check_entitlement_named_grants_cost_no_api_call(git_host):
    broker = git_host.broker()

    broker.check_entitlement("org_a", git_host.url("acme/app"))
    broker.check_entitlement("org_a", git_host.url("octo/hello"))

    assert git_host.github.api_calls == []


def test_check_entitlement_grant_on_another_host_does_not_cover_this_one(git_host):
    broker = git_host.broker()

    _refusal(broker, "org_a", "https://github.com/acme/app.git")


def test_entitlements_public_hosts_allow_any_repository_there(git_host):
    broker = git_host.broker({"public": {"hosts": ["codeberg.org"]}})

    entitlement = broker.check_entitlement(
        "org_x", "https://codeberg.org/anyone/anything.git"
    )

    assert not entitlement.needs_token


def test_load_entitlements_adds_the_file_and_the_variable_up(tmp_path):
    path = tmp_path / "entitlements.json"
    path.write_text(json.dumps({"orgs": {"org_a": {"owners": ["acme"]}}}))
    text = json.dumps(
        {
            "orgs": {"org_a": {"repositories": ["partner/lib"]}, "org_b": {}},
            "public": {"owners": ["python"]},
        }
    )

    entitlements = load_entitlements(
        text=text, path=str(path), default_host="github.com"
    )

    assert entitlements.orgs["org_a"].owners == {"github.com/acme"}
    assert entitlements.orgs["org_a"].repositories == {"github.com/partner/lib"}
    assert "org_b" in entitlements.orgs
    assert entitlements.public.owners == {"github.com/python"}


def test_entitlements_parse_hosts_and_installations():
    entitlements = Entitlements.parse(
        {
            "orgs": {
                "org_a": {
                    "owners": ["ghe.example.com/Acme"],
                    "repositories": ["ghe.example.com/acme/App"],
                    "installations": [42, "ghe.example.com/7", "8"],
                }
            }
        },
        default_host="github.com",
        source="test",
    )

    grants = entitlements.orgs["org_a"]
    assert grants.owners == {"ghe.example.com/acme"}
    assert grants.repositories == {"ghe.example.com/acme/app"}
    assert grants.installations == {
        ("github.com", 42),
        ("ghe.example.com", 7),
        ("github.com", 8),
    }
    assert entitlements.private_hosts() == {"ghe.example.com", "github.com"}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], "expected a JSON object"),
        ({"org": {}}, "unknown keys"),
        ({"orgs": {"a": {"owner": ["x"]}}}, "unknown keys"),
        ({"orgs": {"a": {"owners": "acme"}}}, "list of strings"),
        ({"orgs": {"a": {"owners": ["a/b/c"]}}}, "not a valid name"),
        ({"orgs": {"a": {"repositories": ["just-a-name"]}}}, "not a valid name"),
        ({"orgs": {"a": {"installations": ["x"]}}}, "not an installation id"),
        ({"orgs": {"a": {"installations": [True]}}}, "not an installation id"),
        ({"orgs": []}, "'orgs' must be an object"),
        ({"public": {"hosts": ["not a host"]}}, "not a valid name"),
    ],
)
def test_entitlements_parse_refuses_a_bad_document(document, problem):
    with pytest.raises(ConfigurationError, match=problem):
        Entitlements.parse(document, default_host="github.com", source="test")


def test_load_entitlements_reports_bad_json_and_missing_files(tmp_path):
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        load_entitlements(text="{nope", path=None, default_host="github.com")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_entitlements(
            text=None, path=str(tmp_path / "missing.json"), default_host="github.com"
        )


def test_check_entitlement_by_installation_with_the_api_down_is_a_503(git_host):
    git_host.github.fail_status = 503

    with pytest.raises(ProviderUnavailable) as caught:
        git_host.broker().check_entitlement("org_b", git_host.url("beta/secret"))

    assert caught.value.status == 503
    assert caught.value.retryable
