"""Git source URLs and refs: what is accepted, normalised and refused."""

from __future__ import annotations

import pytest

from enclave.broker import InvalidGitSource, parse_git_url, validate_ref
from enclave.broker.repository import parse_repository_name


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/acme/app",
        "https://github.com/acme/app.git",
        "https://github.com/acme/app/",
        "https://GitHub.com/acme/app.git",
        "https://github.com:443/acme/app.git",
    ],
)
def test_parse_git_url_normalises_the_usual_forms(url):
    repository = parse_git_url(url)

    assert repository.host == "github.com"
    assert (repository.owner, repository.name) == ("acme", "app")
    assert repository.url == "https://github.com/acme/app.git"
    assert str(repository) == "github.com/acme/app"


def test_parse_git_url_keeps_a_port_other_than_443():
    repository = parse_git_url("https://127.0.0.1:8443/acme/app.git")

    assert repository.host == "127.0.0.1:8443"
    assert repository.url == "https://127.0.0.1:8443/acme/app.git"


def test_parse_git_url_compares_case_blind():
    assert (
        parse_git_url("https://github.com/Acme/App").key
        == parse_git_url("https://github.com/acme/app.git").key
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://github.com/acme/app.git",
        "ssh://git@github.com/acme/app.git",
        "git@github.com:acme/app.git",
        "file:///srv/git/app.git",
        "ext::sh -c touch% /tmp/x",
        "https://github.com/acme",
        "https://github.com/acme/app/tree/main",
        "https://github.com/acme/app.git?ref=main",
        "https://github.com/acme/app.git#main",
        "https://github.com/acme/%2e%2e",
        "https://github.com/acme/..",
        "https://github.com/-acme/app",
        "https://github.com/acme/-app",
        "https://[::1]/acme/app",
        "https://exa_mple.com/acme/app",
        "https://github.com/acme/app\n",
        "https://github.com/acme/a pp",
        "",
        None,
    ],
)
def test_parse_git_url_refuses_anything_else(url):
    with pytest.raises(InvalidGitSource) as caught:
        parse_git_url(url)

    assert caught.value.status == 422
    assert caught.value.errors["json"]["source"]["git"]["url"]


@pytest.mark.parametrize(
    "url",
    [
        "https://x-access-token:ghs_SECRETVALUE@github.com/acme/app.git",
        "https://ghs_SECRETVALUE@github.com/acme/app.git",
        "https://:ghs_SECRETVALUE@github.com/acme/app.git",
    ],
)
def test_parse_git_url_refuses_credentials_without_echoing_them(url):
    with pytest.raises(InvalidGitSource) as caught:
        parse_git_url(url)

    error = caught.value
    assert "SECRETVALUE" not in str(error.to_dict())
    assert "SECRETVALUE" not in error.reason


@pytest.mark.parametrize(
    "ref",
    ["main", "feature/login", "v1.0", "release-2024.01", "refs/heads/main", "a" * 40],
)
def test_validate_ref_accepts_branches_tags_and_commits(ref):
    assert validate_ref(ref) == ref


def test_validate_ref_accepts_no_ref():
    assert validate_ref(None) is None


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "-upload-pack=touch",
        "--depth=1",
        "+refs/heads/main",
        "main:refs/heads/evil",
        "a..b",
        "a b",
        "a~1",
        "a^",
        "a?",
        "a*",
        "a[",
        "a\\b",
        "@",
        "a@{1}",
        "main.lock",
        "main/",
        "/main",
        ".hidden",
        "a/.b",
        "a//b",
        "a\x00b",
        "x" * 256,
        42,
    ],
)
def test_validate_ref_refuses_what_git_or_a_refspec_would_misread(ref):
    with pytest.raises(InvalidGitSource) as caught:
        validate_ref(ref)

    assert caught.value.field == "ref"
    assert caught.value.errors["json"]["source"]["git"]["ref"]


def test_parse_repository_name_uses_the_default_host():
    assert str(parse_repository_name("acme/app", "github.com")) == "github.com/acme/app"
    assert (
        str(parse_repository_name("ghe.example.com/acme/app", "github.com"))
        == "ghe.example.com/acme/app"
    )
