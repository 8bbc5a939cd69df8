"""Service bindings from the deployment's configuration (`enclave.egress.bindings`)."""

from __future__ import annotations

import json

import pytest

from enclave.config import Settings
from enclave.egress.bindings import BindingConfig
from enclave.errors import ConfigurationError

GITHUB = {
    "host": "API.GitHub.com",
    "header": "Authorization",
    "template": "Bearer {value}",
    "value_env": "ENCLAVE_TEST_GITHUB_TOKEN",
}


def settings_with(**values) -> Settings:
    environ = {"ENCLAVE_ENV": "test", "ENCLAVE_AUTH_DISABLED": "1"}
    environ.update({f"ENCLAVE_EGRESS_{k.upper()}": v for k, v in values.items()})
    return Settings.load(environ)


def test_bindings_load_from_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "bindings.json"
    path.write_text(json.dumps({"org_a": {"github": GITHUB}}))
    monkeypatch.setenv("ENCLAVE_TEST_GITHUB_TOKEN", "ghs_from_env")
    settings = settings_with(
        bindings_file=str(path),
        bindings=json.dumps(
            {
                "org_b": {
                    "api": {"host": "api.test", "header": "X-Key", "value": "inline"}
                }
            }
        ),
    )

    config = BindingConfig.load(settings)

    assert config.names("org_a") == {"github"}
    assert config.names("org_b") == {"api"}
    assert config.names("org_c") == frozenset()
    github = config.get("org_a", "github")
    assert github.host == "api.github.com"
    assert github.header_value() == "Bearer ghs_from_env"
    assert config.get("org_b", "api").header_value() == "inline"
    assert config.get("org_a", "api") is None


def test_bindings_never_show_their_value(monkeypatch):
    config = BindingConfig.load(
        settings_with(
            bindings=json.dumps(
                {
                    "org_a": {
                        "k": {
                            "host": "api.test",
                            "header": "X-Key",
                            "value": "s3cr3t-value",
                        }
                    }
                }
            )
        )
    )

    assert "s3cr3t-value" not in repr(config.get("org_a", "k"))
    assert "s3cr3t-value" not in repr(settings_with())


def test_bindings_value_missing_is_found_by_the_start_up_check(monkeypatch):
    monkeypatch.delenv("ENCLAVE_TEST_GITHUB_TOKEN", raising=False)
    config = BindingConfig.load(
        settings_with(bindings=json.dumps({"org_a": {"github": GITHUB}}))
    )

    # The web and worker processes only need the names.
    assert config.names("org_a") == {"github"}
    with pytest.raises(ConfigurationError, match="ENCLAVE_TEST_GITHUB_TOKEN"):
        config.check_values()


def test_bindings_value_with_a_line_break_is_refused(monkeypatch):
    monkeypatch.setenv("ENCLAVE_TEST_GITHUB_TOKEN", "abc\r\nX-Injected: 1")
    config = BindingConfig.load(
        settings_with(bindings=json.dumps({"org_a": {"github": GITHUB}}))
    )

    with pytest.raises(ConfigurationError, match="line break"):
        config.check_values()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**GITHUB, "host": "127.0.0.1"}, "host name"),
        ({**GITHUB, "host": "*.github.com"}, "host name"),
        ({**GITHUB, "header": "Host"}, "header"),
        ({**GITHUB, "header": "Proxy-Authorization"}, "header"),
        ({**GITHUB, "header": "Bad Header"}, "header"),
        ({**GITHUB, "template": "Bearer"}, "template"),
        ({**GITHUB, "template": "{value}{value}"}, "template"),
        ({**GITHUB, "value": "both"}, "exactly one"),
        ({k: v for k, v in GITHUB.items() if k != "value_env"}, "exactly one"),
        ({**GITHUB, "colour": "blue"}, "unknown fields"),
    ],
)
def test_bindings_invalid_configuration_fails_settings(spec, message):
    with pytest.raises(ConfigurationError, match=message):
        settings_with(bindings=json.dumps({"org_a": {"github": spec}}))


def test_bindings_defined_twice_or_malformed_fail_settings(tmp_path):
    path = tmp_path / "bindings.json"
    path.write_text(json.dumps({"org_a": {"github": GITHUB}}))
    with pytest.raises(ConfigurationError, match="twice"):
        settings_with(
            bindings_file=str(path), bindings=json.dumps({"org_a": {"github": GITHUB}})
        )
    with pytest.raises(ConfigurationError, match="not JSON"):
        settings_with(bindings="{")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        settings_with(bindings_file=str(tmp_path / "missing.json"))
