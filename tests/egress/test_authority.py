"""The proxy's CA and the bundles made from it (`enclave.egress.authority`)."""

from __future__ import annotations

import stat
from pathlib import Path

import certifi
import pytest

from enclave.config import Settings
from enclave.egress.authority import (
    CA_BASENAME,
    CA_CERT_FILE,
    prepare_authority,
    sandbox_bundle_path,
    upstream_bundle_path,
)
from enclave.errors import ConfigurationError


def make_settings(tmp_path, **values) -> Settings:
    environ = {
        "ENCLAVE_ENV": "test",
        "ENCLAVE_AUTH_DISABLED": "1",
        "ENCLAVE_STATE_DIR": str(tmp_path / "state"),
    }
    environ.update({f"ENCLAVE_EGRESS_{k.upper()}": v for k, v in values.items()})
    return Settings.load(environ)


def test_authority_is_made_once_and_kept_private(tmp_path, test_authority):
    settings = make_settings(
        tmp_path,
        ca_dir=str(tmp_path / "ca"),
        extra_ca_file=str(test_authority.ca_file),
    )

    directory = prepare_authority(settings)
    first = (directory / CA_CERT_FILE).read_bytes()
    prepare_authority(settings)

    assert (directory / CA_CERT_FILE).read_bytes() == first
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key_file = directory / f"{CA_BASENAME}-ca.pem"
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_authority_bundles_hold_the_right_certificates(tmp_path, test_authority):
    settings = make_settings(
        tmp_path,
        ca_dir=str(tmp_path / "ca"),
        extra_ca_file=str(test_authority.ca_file),
    )
    directory = prepare_authority(settings)
    ca_cert = (directory / CA_CERT_FILE).read_bytes().strip()
    extra = test_authority.ca_file.read_bytes().strip()
    roots = Path(certifi.where()).read_bytes().strip()

    sandbox = sandbox_bundle_path(settings).read_bytes()
    upstream = upstream_bundle_path(settings).read_bytes()

    assert b"PRIVATE KEY" not in sandbox and b"PRIVATE KEY" not in upstream
    assert ca_cert in sandbox and extra in sandbox and roots in sandbox
    # The proxy never trusts its own CA for the hosts it dials.
    assert ca_cert not in upstream
    assert extra in upstream and roots in upstream


def test_authority_default_directory_follows_the_state_directory(tmp_path):
    settings = make_settings(tmp_path)

    assert sandbox_bundle_path(settings).parent == tmp_path / "state" / "egress-ca"


def test_authority_refuses_an_extra_file_without_certificates(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    settings = make_settings(
        tmp_path, ca_dir=str(tmp_path / "ca"), extra_ca_file=str(empty)
    )

    with pytest.raises(ConfigurationError, match="no PEM certificate"):
        prepare_authority(settings)
