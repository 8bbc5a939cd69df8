"""Settings: defaults per environment from `config/`, overridden by `ENCLAVE_*`.

Every process (web, worker, reaper, egress) is configured by environment
variables alone; `config/<env>.py` only changes the defaults of one
environment. `Settings.load()` validates everything at start-up so that a bad
deployment fails loudly before it serves anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from enclave.errors import ConfigurationError
from enclave.sessions.spec import Limits

logger = logging.getLogger(__name__)

ENVIRONMENTS = ("development", "test", "production")
MIN_JWT_SECRET_BYTES = 32

DEFAULT_LIMITS = Limits(
    timeout_s=30,
    cpu_s=30,
    memory_mb=256,
    cpus=1.0,
    pids=128,
    output_bytes=1024 * 1024,
    disk_mb=64,
)
MAX_LIMITS = Limits(
    timeout_s=3600,
    cpu_s=3600,
    memory_mb=4096,
    cpus=4.0,
    pids=1024,
    output_bytes=16 * 1024 * 1024,
    disk_mb=2048,
)


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    database_url: str = "sqlite:///enclave.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    backend: str = "simulator"
    log_level: str = "INFO"

    jwt_secret: str = field(default="", repr=False)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    auth_disabled: bool = False
    console_api_url: str | None = None
    console_api_token: str | None = field(default=None, repr=False)
    console_api_timeout_s: float = 3.0
    api_key_cache_s: int = 30

    default_limits: Limits = DEFAULT_LIMITS
    max_limits: Limits = MAX_LIMITS
    max_active_sessions_per_org: int = 100
    max_body_bytes: int = 2 * 1024 * 1024
    max_code_bytes: int = 1024 * 1024
    max_stdin_bytes: int = 1024 * 1024
    idempotency_ttl_s: int = 24 * 3600

    queue_name: str = "enclave-sessions"
    sse_keepalive_s: float = 15.0
    lease_ttl_s: int = 10
    heartbeat_s: float = 2.0
    reaper_interval_s: float = 5.0

    state_dir: str = "/tmp/enclave"
    sandbox_image: str = "enclave-sandbox:latest"
    sandbox_rootfs: str | None = None
    docker_url: str | None = None

    # The `kubernetes` backend. Without a kubeconfig it uses the in-cluster
    # service account, then the usual kubeconfig (KUBECONFIG, ~/.kube/config).
    kubernetes_kubeconfig: str | None = None
    kubernetes_namespace: str = "enclave-sessions"
    kubernetes_runtime_class: str | None = None
    # The egress proxy's Service: its cluster IP, port and selector are read
    # from the API server, so that sessions reach the proxy with no DNS.
    kubernetes_egress_namespace: str = "enclave"
    kubernetes_egress_service: str = "enclave-egress"
    kubernetes_request_timeout_s: float = 10.0
    # Time for a Pod to be scheduled and pull its image before it runs.
    kubernetes_start_timeout_s: float = 120.0
    # How long a running session may lose the API server before its launch
    # gives up on it (the Pod's own deadline still ends it).
    kubernetes_api_grace_s: float = 60.0

    simulator_step_s: float = 0.05

    # Private git sources (enclave.broker): the GitHub App that mints tokens,
    # the host its repositories live on, and what each org may clone.
    github_app_id: str | None = None
    github_app_private_key: str | None = field(default=None, repr=False)
    github_app_private_key_file: str | None = None
    github_api_url: str = "https://api.github.com"
    github_host: str = "github.com"
    github_api_timeout_s: float = 10.0
    git_ca_bundle: str | None = None
    git_entitlements: str | None = None
    git_entitlements_file: str | None = None

    # The egress proxy (`python -m enclave.egress`) and the path to it.
    egress_proxy_address: str = "127.0.0.1:8180"
    egress_sessions_dir: str | None = None
    egress_ca_dir: str | None = None
    egress_extra_ca_file: str | None = None
    egress_bindings_file: str | None = None
    egress_bindings: str | None = field(default=None, repr=False)
    egress_resolve_overrides: str | None = None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        env = environ.get("ENCLAVE_ENV", "development")
        if env not in ENVIRONMENTS:
            raise ConfigurationError(
                f"ENCLAVE_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}"
            )

        values: dict[str, Any] = {"env": env}
        values.update(_environment_defaults(env))
        values.update(_from_environ(environ))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.auth_disabled and self.env == "production":
            raise ConfigurationError(
                "ENCLAVE_AUTH_DISABLED=1 is refused when ENCLAVE_ENV=production"
            )
        if (
            not self.auth_disabled
            and len(self.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES
        ):
            raise ConfigurationError(
                "ENCLAVE_JWT_SECRET must be set to at least "
                f"{MIN_JWT_SECRET_BYTES} bytes (generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        if self.egress_resolve_overrides and self.env != "test":
            # Pointing names at chosen addresses turns the egress proxy's
            # address checks off for them: only a test deployment may do that.
            raise ConfigurationError(
                "ENCLAVE_EGRESS_RESOLVE_OVERRIDES is refused unless ENCLAVE_ENV=test"
            )
        # Imported here: the egress package reads settings, not the reverse.
        from enclave.egress.bindings import BindingConfig
        from enclave.egress.resolver import parse_overrides

        parse_overrides(self.egress_resolve_overrides)
        # The shape only; values are looked at by the egress proxy alone.
        BindingConfig.load(self)
        for name in Limits.FIELDS:
            if getattr(self.default_limits, name) > getattr(self.max_limits, name):
                raise ConfigurationError(
                    f"the default {name} is above the deployment's maximum"
                )

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _environment_defaults(env: str) -> dict[str, Any]:
    """The defaults `config/<env>.py` sets, as module-level lowercase names."""
    try:
        module = importlib.import_module(f"config.{env}")
    except ModuleNotFoundError:
        return {}
    names = {f.name for f in dataclasses.fields(Settings)}
    return {k: v for k, v in vars(module).items() if k in names}


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    fallbacks = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}
    for f in dataclasses.fields(Settings):
        if f.name == "env":
            continue
        raw = environ.get(f"ENCLAVE_{f.name.upper()}")
        if raw is None and f.name in fallbacks:
            raw = environ.get(fallbacks[f.name])
        if raw is None:
            continue
        values[f.name] = _parse(f.name, f.type, raw)
    return values


def _parse(name: str, type_name: Any, raw: str) -> Any:
    variable = f"ENCLAVE_{name.upper()}"
    type_name = str(type_name)
    try:
        if type_name == "bool":
            return _parse_bool(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "Limits":
            return _parse_limits(name, raw)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{variable} is not valid: {exc}") from None
    if type_name.endswith("| None") and raw == "":
        return None
    return raw


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not a boolean")


def _parse_limits(name: str, raw: str) -> Limits:
    """Limits from JSON; fields left out keep the built-in value."""
    base = DEFAULT_LIMITS if name == "default_limits" else MAX_LIMITS
    given = json.loads(raw)
    if not isinstance(given, dict):
        raise ValueError("expected a JSON object of limits")
    unknown = set(given) - set(Limits.FIELDS)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}")
    return Limits.from_dict({**base.to_dict(), **given})
