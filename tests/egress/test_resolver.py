"""Resolving once, judging the answers, dialing what was judged (egress.resolver).

Lookups are real `getaddrinfo` calls for names this machine resolves from
/etc/hosts (`localhost`), or a lookup function given to the `Resolver` that
answers chosen addresses, so that no DNS query leaves the machine.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from enclave.config import Settings
from enclave.egress.resolver import (
    PRIVATE_ADDRESS,
    UNRESOLVABLE,
    Pins,
    Resolver,
    install_pinned_resolver,
    is_public_address,
    parse_overrides,
)
from enclave.errors import ConfigurationError


def answering(*addresses):
    def lookup(name, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    return lookup


def failing(name, port, type=0):
    raise socket.gaierror(socket.EAI_NONAME, "no such name")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("127.54.1.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.100.100.200", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),
        ("not an address", False),
    ],
)
def test_resolver_public_addresses(address, public):
    assert is_public_address(address) is public


def test_resolver_accepts_a_name_with_only_public_answers():
    verdict = Resolver(lookup=answering("93.184.216.34")).check("example.test")

    assert verdict.address == "93.184.216.34" and verdict.reason is None


def test_resolver_refuses_a_name_with_any_private_answer():
    verdict = Resolver(lookup=answering("93.184.216.34", "169.254.169.254")).check(
        "mixed.test"
    )

    assert verdict.address is None and verdict.reason == PRIVATE_ADDRESS


def test_resolver_refuses_localhost_through_the_real_resolver():
    assert Resolver().check("localhost").reason == PRIVATE_ADDRESS


def test_resolver_reports_unresolvable_names():
    assert Resolver(lookup=failing).check("nowhere.test").reason == UNRESOLVABLE


def test_resolver_override_to_loopback_is_exempt_and_others_are_checked():
    resolver = Resolver(
        {"api.test": "127.9.9.9", "private.test": "10.0.0.1"}, lookup=failing
    )

    assert resolver.check("api.test").address == "127.9.9.9"
    assert resolver.check("private.test").reason == PRIVATE_ADDRESS
    # A name the overrides do not map still goes to the real lookup.
    assert resolver.check("other.test").reason == UNRESOLVABLE


def test_resolver_overrides_parse_and_refuse_bad_values():
    assert parse_overrides('{"API.test.": "127.0.0.5"}') == {"api.test": "127.0.0.5"}
    assert parse_overrides(None) == {}
    for bad in ('["api.test"]', '{"api.test": "nowhere"}', "{"):
        with pytest.raises(ConfigurationError):
            parse_overrides(bad)


def test_resolver_overrides_refused_outside_test_settings():
    overrides = '{"api.test": "127.0.0.1"}'
    for env in ("development", "production"):
        with pytest.raises(ConfigurationError, match="RESOLVE_OVERRIDES"):
            Settings.load(
                {
                    "ENCLAVE_ENV": env,
                    "ENCLAVE_JWT_SECRET": "s" * 32,
                    "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": overrides,
                }
            )

    settings = Settings.load(
        {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": overrides,
        }
    )
    assert settings.egress_resolve_overrides == overrides


def test_resolver_pins_expire_and_stay_bounded():
    pins = Pins(ttl_s=0.2, size=2)
    pins.pin("a.test", "127.0.0.2")
    pins.pin("b.test", "127.0.0.3")
    pins.pin("c.test", "127.0.0.4")

    assert pins.get("a.test") is None
    assert pins.get("c.test") == "127.0.0.4"
    time.sleep(0.3)
    assert pins.get("c.test") is None
    assert len(pins) == 1


def test_resolver_pinned_loop_dials_the_checked_address_only():
    async def scenario():
        served = []

        async def greet(reader, writer):
            served.append(writer.get_extra_info("sockname")[0])
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.7", 0)
        port = server.sockets[0].getsockname()[1]
        pins = Pins()
        install_pinned_resolver(asyncio.get_running_loop(), pins)
        pins.pin("pinned.test", "127.0.0.7")

        reader, writer = await asyncio.open_connection("pinned.test", port)
        greeting = await reader.read()
        writer.close()
        with pytest.raises(socket.gaierror, match="not checked"):
            await asyncio.open_connection("unpinned.test", port)
        # `localhost` would resolve from /etc/hosts, but was never checked.
        with pytest.raises(socket.gaierror):
            await asyncio.open_connection("localhost", port)
        server.close()
        await server.wait_closed()
        return greeting, served

    greeting, served = asyncio.run(scenario())

    assert greeting == b"hi" and served == ["127.0.0.7"]
