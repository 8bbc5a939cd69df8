"""Fixtures of the egress tests: the test CA, the upstreams and their names.

The upstreams live on a loopback address of their own; the resolver override
(which only a test deployment may set) maps the test names to it, and
`private.test` / `metadata.test` to addresses that must be refused (they are
never dialed: the refusal comes before any connection).
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests.egress.upstreams import TestAuthority, Upstreams

UPSTREAM_NAMES = ["api.test", "other.test", "a.svc.test", "svc.test"]
PRIVATE_NAMES = {"private.test": "10.0.0.1", "metadata.test": "169.254.169.254"}
BOUND_ORG = "org_bound"
BINDING_NAME = "apitest"
BINDING_VALUE_ENV = "ENCLAVE_TEST_BINDING_VALUE"


@pytest.fixture(scope="session")
def test_authority(tmp_path_factory) -> TestAuthority:
    return TestAuthority(tmp_path_factory.mktemp("egress-ca"), UPSTREAM_NAMES)


@pytest.fixture(scope="session")
def upstreams(test_authority):
    servers = Upstreams(test_authority)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def binding_secret() -> str:
    """The credential the proxy injects; tests look for it everywhere it must not be."""
    return "bnd-" + secrets.token_hex(20)


@pytest.fixture(scope="session")
def egress_env(test_authority, upstreams, binding_secret) -> dict[str, str]:
    """The settings of a deployment whose sessions can reach the upstreams."""
    overrides = {name: upstreams.address for name in UPSTREAM_NAMES}
    overrides.update(PRIVATE_NAMES)
    bindings = {
        BOUND_ORG: {
            BINDING_NAME: {
                "host": "api.test",
                "header": "Authorization",
                "template": "Bearer {value}",
                "value_env": BINDING_VALUE_ENV,
            }
        }
    }
    return {
        "ENCLAVE_EGRESS_RESOLVE_OVERRIDES": json.dumps(overrides),
        "ENCLAVE_EGRESS_EXTRA_CA_FILE": str(test_authority.ca_file),
        "ENCLAVE_EGRESS_BINDINGS": json.dumps(bindings),
        BINDING_VALUE_ENV: binding_secret,
    }
