"""Settings: refuse to start on a deployment that is not safe or not complete."""

from __future__ import annotations

import pytest

from enclave.config import Settings
from enclave.errors import ConfigurationError

SECRET = "s" * 32


def test_settings_refuse_missing_jwt_secret():
    with pytest.raises(ConfigurationError, match="ENCLAVE_JWT_SECRET"):
        Settings.load({"ENCLAVE_ENV": "development"})


def test_settings_refuse_short_jwt_secret():
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Settings.load({"ENCLAVE_JWT_SECRET": "s" * 31})


def test_settings_allow_missing_secret_with_dev_bypass():
    settings = Settings.load({"ENCLAVE_AUTH_DISABLED": "1"})

    assert settings.auth_disabled is True


def test_settings_refuse_dev_bypass_in_production():
    with pytest.raises(ConfigurationError, match="production"):
        Settings.load(
            {
                "ENCLAVE_ENV": "production",
                "ENCLAVE_AUTH_DISABLED": "1",
                "ENCLAVE_JWT_SECRET": SECRET,
            }
        )


def test_settings_fall_back_to_paas_urls():
    settings = Settings.load(
        {
            "ENCLAVE_JWT_SECRET": SECRET,
            "DATABASE_URL": "postgresql://db/x",
            "REDIS_URL": "redis://r:1/2",
        }
    )

    assert settings.database_url == "postgresql://db/x"
    assert settings.redis_url == "redis://r:1/2"


def test_settings_prefer_enclave_urls_over_paas_ones():
    settings = Settings.load(
        {
            "ENCLAVE_JWT_SECRET": SECRET,
            "DATABASE_URL": "postgresql://db/paas",
            "ENCLAVE_DATABASE_URL": "postgresql://db/own",
        }
    )

    assert settings.database_url == "postgresql://db/own"


def test_settings_read_limits_as_json():
    settings = Settings.load(
        {"ENCLAVE_JWT_SECRET": SECRET, "ENCLAVE_DEFAULT_LIMITS": '{"timeout_s": 5}'}
    )

    assert settings.default_limits.timeout_s == 5
    assert settings.default_limits.memory_mb == 256


@pytest.mark.parametrize(
    "name, value",
    [
        ("ENCLAVE_ENV", "staging"),
        ("ENCLAVE_AUTH_DISABLED", "perhaps"),
        ("ENCLAVE_MAX_BODY_BYTES", "big"),
        ("ENCLAVE_DEFAULT_LIMITS", '{"speed": 1}'),
        ("ENCLAVE_DEFAULT_LIMITS", '{"timeout_s": 999999}'),
    ],
)
def test_settings_refuse_bad_values(name, value):
    with pytest.raises(ConfigurationError):
        Settings.load({"ENCLAVE_JWT_SECRET": SECRET, name: value})


def test_production_needs_its_services_named():
    settings = Settings.load(
        {"ENCLAVE_ENV": "production", "ENCLAVE_JWT_SECRET": SECRET}
    )

    assert settings.database_url == "" and settings.redis_url == ""
