"""Host spelling, literals and allow-list matching (`enclave.egress.hosts`)."""

from __future__ import annotations

import pytest

from enclave.egress.hosts import (
    canonical_host,
    host_allowed,
    is_ip_literal,
    is_valid_name,
    split_authority,
)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.0.0.1",
        "::1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "fe80::1%eth0",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "1.2.3.4.5",
        "169.254.169.254.",
    ],
)
def test_hosts_ip_literal_in_any_spelling(host):
    assert is_ip_literal(host)


@pytest.mark.parametrize("host", ["api.test", "a.svc.test", "localhost", "123.example"])
def test_hosts_names_are_not_literals(host):
    assert not is_ip_literal(host)


def test_hosts_canonical_spelling():
    assert canonical_host("API.Test.") == "api.test"
    assert canonical_host("[::1]") == "::1"


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("api.test", True),
        ("a-b.c", True),
        ("under_score.test", False),
        ("-lead.test", False),
        ("percent%.test", False),
        ("", False),
        ("a" * 64 + ".test", False),
    ],
)
def test_hosts_valid_names(host, valid):
    assert is_valid_name(host) is valid


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.test", True),
        ("API.TEST.", True),
        ("a.svc.test", True),
        ("b.a.svc.test", True),
        ("svc.test", False),
        ("evilsvc.test", False),
        ("api.test.evil", False),
        ("other.test", False),
    ],
)
def test_hosts_allow_list_exact_and_wildcard(host, allowed):
    assert host_allowed(host, ["api.test", "*.svc.test"]) is allowed


def test_hosts_empty_allow_list_allows_nothing():
    assert not host_allowed("api.test", [])


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("api.test", ("api.test", 443)),
        ("api.test:80", ("api.test", 80)),
        ("API.test.:8443", ("api.test", 8443)),
        ("[::1]:443", ("::1", 443)),
        ("[::1]", ("::1", 443)),
        ("::1", ("::1", 443)),
        ("api.test:0", None),
        ("api.test:99999", None),
        ("api.test:http", None),
        ("[::1]x", None),
    ],
)
def test_hosts_split_authority(authority, expected):
    assert split_authority(authority, 443) == expected
