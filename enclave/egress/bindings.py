"""Service bindings: named credentials the egress proxy puts on the wire.

A binding belongs to one organisation and one host. When a session that
names it reaches that host, the proxy terminates TLS and sets the binding's
header on every request, overwriting whatever the sandbox sent; the sandbox
never holds the value.

The deployment configures bindings as JSON, from the file named by
`ENCLAVE_EGRESS_BINDINGS_FILE`, from `ENCLAVE_EGRESS_BINDINGS`, or both (a
name defined in both is an error):

    {
      "org_acme": {
        "github": {
          "host": "api.github.com",
          "header": "Authorization",
          "template": "Bearer {value}",
          "value_env": "ACME_GITHUB_TOKEN"
        }
      }
    }

`template` is optional (the value alone by default). The value comes either
from `value_env`, the name of an environment variable read only when the
proxy needs it, or inline from `value`. With `value_env`, every process can
share the JSON while the secret itself is set only in the egress process's
environment; the web and worker processes use the names alone, to validate
requests. Nothing here ever logs or shows a value; `repr` leaves it out.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from enclave.egress.hosts import canonical_host, is_ip_literal, is_valid_name
from enclave.errors import ConfigurationError

VALUE_PLACEHOLDER = "{value}"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers that carry the connection itself or the proxy's own credentials:
# replacing them would break the request or the proxy, not authenticate it.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
    }
)
_FIELDS = {"host", "header", "template", "value", "value_env"}


@dataclass(frozen=True)
class Binding:
    org_id: str
    name: str
    host: str
    header: str
    template: str = VALUE_PLACEHOLDER
    value_env: str | None = None
    value: str | None = field(default=None, repr=False, compare=False)

    def header_value(self) -> str:
        """The header's value with the secret filled in; raises if it is unset."""
        secret = self.value
        if self.value_env is not None:
            secret = os.environ.get(self.value_env)
        if not secret:
            raise ConfigurationError(
                f"service binding {self.name!r} of {self.org_id!r} has no value: "
                f"set {self.value_env or 'value'}"
            )
        if "\r" in secret or "\n" in secret or "\0" in secret:
            raise ConfigurationError(
                f"the value of service binding {self.name!r} of {self.org_id!r} "
                "holds a line break or NUL, which no header may carry"
            )
        return self.template.replace(VALUE_PLACEHOLDER, secret)


class BindingConfig:
    """Every binding of the deployment, by organisation and name."""

    def __init__(self, bindings: list[Binding] | None = None) -> None:
        self._by_org: dict[str, dict[str, Binding]] = {}
        for binding in bindings or []:
            names = self._by_org.setdefault(binding.org_id, {})
            if binding.name in names:
                raise ConfigurationError(
                    f"service binding {binding.name!r} of {binding.org_id!r} "
                    "is defined twice"
                )
            names[binding.name] = binding

    @classmethod
    def load(cls, settings) -> BindingConfig:
        bindings: list[Binding] = []
        if settings.egress_bindings_file:
            path = Path(settings.egress_bindings_file)
            try:
                raw = path.read_text()
            except OSError as exc:
                raise ConfigurationError(
                    f"ENCLAVE_EGRESS_BINDINGS_FILE cannot be read: {exc.strerror}"
                ) from None
            bindings += _parse(raw, "ENCLAVE_EGRESS_BINDINGS_FILE")
        if settings.egress_bindings:
            bindings += _parse(settings.egress_bindings, "ENCLAVE_EGRESS_BINDINGS")
        return cls(bindings)

    def names(self, org_id: str) -> frozenset[str]:
        return frozenset(self._by_org.get(org_id, {}))

    def get(self, org_id: str, name: str) -> Binding | None:
        return self._by_org.get(org_id, {}).get(name)

    def all(self) -> list[Binding]:
        return [b for names in self._by_org.values() for b in names.values()]

    def check_values(self) -> None:
        """Fail unless every binding's value is available (the proxy's start check)."""
        for binding in self.all():
            binding.header_value()


@functools.lru_cache(maxsize=8)
def binding_config(settings) -> BindingConfig:
    """The deployment's bindings, read once per settings object."""
    return BindingConfig.load(settings)


def _parse(raw: str, source: str) -> list[Binding]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{source} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigurationError(f"{source} must map organisation ids to bindings")

    bindings = []
    for org_id, named in document.items():
        if not isinstance(named, dict):
            raise ConfigurationError(
                f"{source}: the bindings of {org_id!r} must be an object"
            )
        for name, spec in named.items():
            bindings.append(_binding(source, str(org_id), str(name), spec))
    return bindings


def _binding(source: str, org_id: str, name: str, spec) -> Binding:
    where = f"{source}: service binding {name!r} of {org_id!r}"
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where} must be an object")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ConfigurationError(f"{where} has unknown fields {sorted(unknown)}")
    if not 1 <= len(name) <= 64:
        raise ConfigurationError(f"{where}: a name has 1 to 64 characters")

    host = canonical_host(str(spec.get("host", "")))
    if not is_valid_name(host) or is_ip_literal(host):
        raise ConfigurationError(f"{where} needs a host name (not an address)")
    header = str(spec.get("header", ""))
    if not _HEADER_NAME.match(header) or header.lower() in _RESERVED_HEADERS:
        raise ConfigurationError(f"{where} needs a header name it may set")
    template = str(spec.get("template", VALUE_PLACEHOLDER))
    if template.count(VALUE_PLACEHOLDER) != 1 or any(c in template for c in "\r\n"):
        raise ConfigurationError(
            f"{where}: the template must hold {VALUE_PLACEHOLDER} exactly once "
            "and no line break"
        )
    has_value, has_env = "value" in spec, "value_env" in spec
    if has_value == has_env:
        raise ConfigurationError(f"{where} needs exactly one of value and value_env")

    return Binding(
        org_id=org_id,
        name=name,
        host=host,
        header=header,
        template=template,
        value_env=str(spec["value_env"]) if has_env else None,
        value=str(spec["value"]) if has_value else None,
    )
