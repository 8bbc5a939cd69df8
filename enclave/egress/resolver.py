"""Resolving a destination once, checking what it resolved to, and dialing that.

A name is looked up once per attempt (`Resolver.check`). Every address it
resolves to must be public: one loopback, private, link-local, shared,
reserved or multicast answer refuses the name, so that a name answering with
both a public and a metadata address cannot be used to reach the latter. The
first checked address is then pinned (`Pins`): the proxy's event loop
resolves names only through the pins (`install_pinned_resolver`), so the
connection goes to the address that was checked, not to whatever a second
lookup would answer (DNS rebinding).

The test configuration may map names to addresses
(`ENCLAVE_EGRESS_RESOLVE_OVERRIDES`, which `Settings` refuses outside
`ENCLAVE_ENV=test`). A name mapped to a loopback address is the suite's own
upstream on this machine and is exempt from the address check; a name mapped
to any other address is checked like an answer from DNS.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from enclave.errors import ConfigurationError

logger = logging.getLogger(__name__)

# Pins outlive the check that made them long enough for a tunnel to open new
# upstream connections; the table is bounded so that many names cannot grow it
# without end.
PIN_TTL_S = 3600.0
MAX_PINS = 10_000

# Refusal reasons, as reported in `egress` events and the 403's reason header.
UNRESOLVABLE = "unresolvable"
PRIVATE_ADDRESS = "private_address"


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a name: an address to dial, or why not."""

    address: str | None = None
    reason: str | None = None


def is_public_address(text: str) -> bool:
    """Whether an address may be dialed: globally routable and unicast."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 spelling of an IPv4 address is judged as that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(str(embedded))
        if address.teredo is not None:
            return False
    return address.is_global and not address.is_multicast


def parse_overrides(raw: str | None) -> dict[str, str]:
    """The test-only name → address map from its JSON setting."""
    if not raw:
        return {}
    try:
        given = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(
            f"ENCLAVE_EGRESS_RESOLVE_OVERRIDES is not JSON: {exc}"
        ) from None
    if not isinstance(given, dict):
        raise ConfigurationError(
            "ENCLAVE_EGRESS_RESOLVE_OVERRIDES must be a JSON object of name: address"
        )
    overrides = {}
    for name, address in given.items():
        try:
            ipaddress.ip_address(str(address))
        except ValueError:
            raise ConfigurationError(
                f"ENCLAVE_EGRESS_RESOLVE_OVERRIDES maps {name!r} to {address!r}, "
                "which is not an IP address"
            ) from None
        overrides[str(name).lower().removesuffix(".")] = str(address)
    return overrides


class Resolver:
    """Looks names up and judges the answers; blocking, so call it off the loop."""

    def __init__(
        self,
        overrides: Mapping[str, str] | None = None,
        lookup: Callable[..., list] = socket.getaddrinfo,
    ) -> None:
        self.overrides = dict(overrides or {})
        self._lookup = lookup

    def check(self, name: str) -> Verdict:
        """Resolve a canonical, valid name that is not a literal, and judge it."""
        override = self.overrides.get(name)
        if override is not None:
            if ipaddress.ip_address(override).is_loopback:
                return Verdict(address=override)
            addresses = [override]
        else:
            try:
                answers = self._lookup(name, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                return Verdict(reason=UNRESOLVABLE)
            addresses = list(dict.fromkeys(answer[4][0] for answer in answers))
        if not addresses:
            return Verdict(reason=UNRESOLVABLE)
        if not all(is_public_address(address) for address in addresses):
            return Verdict(reason=PRIVATE_ADDRESS)
        return Verdict(address=addresses[0])


class Pins:
    """The addresses checked names were last found at; thread-safe."""

    def __init__(self, ttl_s: float = PIN_TTL_S, size: int = MAX_PINS) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def pin(self, name: str, address: str) -> None:
        with self._lock:
            self._pins.pop(name, None)
            self._pins[name] = (address, time.monotonic() + self.ttl_s)
            while len(self._pins) > self.size:
                self._pins.popitem(last=False)

    def get(self, name: str) -> str | None:
        with self._lock:
            found = self._pins.get(name)
            if found is None:
                return None
            address, expires = found
            if time.monotonic() > expires:
                del self._pins[name]
                return None
            return address

    def __len__(self) -> int:
        with self._lock:
            return len(self._pins)


def install_pinned_resolver(loop, pins: Pins) -> None:
    """Make `loop` resolve names only through `pins`.

    asyncio's connection helpers call `loop.getaddrinfo` for every name they
    dial; shadowing it on the loop instance means no code running on this
    loop can reach a name the proxy has not checked. Numeric hosts need no
    lookup and pass through (the addon refuses literal destinations itself).
    """
    original = loop.getaddrinfo

    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):
        text = host.decode() if isinstance(host, bytes) else host
        if text is None or _is_numeric(text):
            return await original(
                host, port, family=family, type=type, proto=proto, flags=flags
            )
        address = pins.get(text.lower().removesuffix("."))
        if address is None:
            raise socket.gaierror(
                socket.EAI_NONAME, f"{text} was not checked by the egress policy"
            )
        return await original(
            address,
            port,
            family=family,
            type=type,
            proto=proto,
            flags=flags | socket.AI_NUMERICHOST,
        )

    loop.getaddrinfo = getaddrinfo


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
