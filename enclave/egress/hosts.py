"""Host names as the egress policy sees them: spelling, literals and allow-lists.

Everything here is pure string work, shared by the proxy's checks and the
tests. A destination is compared in one canonical spelling: lower case, no
trailing dot, no brackets around an IPv6 literal.
"""

from __future__ import annotations

import ipaddress
import re
import socket

# The only ports a session may reach: HTTPS and HTTP.
ALLOWED_PORTS = frozenset({443, 80})

WILDCARD_PREFIX = "*."

# A name the proxy is willing to look up: dot-separated labels of letters,
# digits and inner hyphens. Anything else (an underscore, a percent sign, a
# colon) is refused before any resolver sees it.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def canonical_host(host: str) -> str:
    """`host` lower-cased, without a trailing dot or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.removesuffix(".")


def is_ip_literal(host: str) -> bool:
    """Whether `host` spells an address rather than a name, in any spelling.

    Beyond the usual dotted quad and IPv6 forms, the C library also accepts
    `2130706433`, `0x7f000001`, `0177.0.0.1` and `127.1` as IPv4 addresses;
    every one of those counts as a literal, as does anything all digits and
    dots or holding a colon or a zone index.
    """
    host = canonical_host(host)
    if not host:
        return False
    if ":" in host or "%" in host:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
        return True
    except (OSError, ValueError):
        pass
    # A last label of digits only can never be a top-level domain, so such a
    # "name" is an address some resolver would read one way or another.
    last = host.rsplit(".", 1)[-1]
    return last.isdigit() or last.startswith("0x")


def is_valid_name(host: str) -> bool:
    """Whether `host` (canonical) is a syntactically valid DNS name."""
    return bool(_NAME.match(host))


def host_allowed(host: str, allow: tuple[str, ...] | list[str]) -> bool:
    """Whether `host` is named by the allow-list.

    An entry `x.y` allows exactly `x.y`; an entry `*.x.y` allows every name
    below `x.y` (`a.x.y`, `a.b.x.y`) but not `x.y` itself.
    """
    host = canonical_host(host)
    for entry in allow:
        entry = canonical_host(entry)
        if entry.startswith(WILDCARD_PREFIX):
            suffix = entry[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == entry:
            return True
    return False


def split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) from a Host header or CONNECT target; None when malformed."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif authority.count(":") > 1:
        # A bare IPv6 address with no port.
        host, port_text = authority, ""
    else:
        host, _, port_text = authority.partition(":")
    if not port_text:
        return canonical_host(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return canonical_host(host), int(port_text)
