"""The vocabulary of a session: phases, kill reasons, limits and launch specs.

These types are shared by the API, the orchestrator, the workers and every
backend, so that one field name means one thing everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Language = Literal["python", "node"]
LANGUAGES: tuple[str, ...] = ("python", "node")


class Phase(str, enum.Enum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.KILLED})
ACTIVE_PHASES = frozenset(set(Phase) - TERMINAL_PHASES)


class KillReason(str, enum.Enum):
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_LIMIT = "output_limit"
    CPU = "cpu"
    TEARDOWN = "teardown"
    WORKER_LOST = "worker_lost"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one session; in a `LaunchSpec` every field is set."""

    timeout_s: float
    cpu_s: float
    memory_mb: int
    cpus: float
    pids: int
    output_bytes: int
    disk_mb: int

    FIELDS = (
        "timeout_s",
        "cpu_s",
        "memory_mb",
        "cpus",
        "pids",
        "output_bytes",
        "disk_mb",
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Limits":
        return cls(**{name: values[name] for name in cls.FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


def fill_limits(requested: dict[str, Any], defaults: Limits) -> Limits:
    """Complete a request's partial limits from the deployment's defaults.

    `cpu_s` left unset follows the session's own `timeout_s`, as the contract
    says, rather than the deployment's default CPU time.
    """
    values = defaults.to_dict()
    values.update({k: v for k, v in requested.items() if v is not None})
    if requested.get("cpu_s") is None:
        values["cpu_s"] = values["timeout_s"]
    return Limits.from_dict(values)


def limits_over(requested: dict[str, Any], maximum: Limits) -> dict[str, list[str]]:
    """Field errors for every requested limit above the deployment's maximum."""
    errors = {}
    for name, value in requested.items():
        ceiling = getattr(maximum, name)
        if value is not None and value > ceiling:
            errors[name] = [f"Must be at most {ceiling} on this deployment."]
    return errors


@dataclass(frozen=True)
class EgressPolicy:
    """Hosts a session may reach; empty means no network at all."""

    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class GitSource:
    url: str
    ref: str | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to run one session, and nothing secret."""

    session_id: str
    code: str
    language: Language
    limits: Limits
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    service_bindings: tuple[str, ...] = ()
    stdin: str | None = None
    source: GitSource | None = None
    org_id: str = ""


@dataclass(frozen=True)
class SessionResult:
    """How a run ended, as the backend saw it.

    `phase` is terminal. `signal` is the signal that ended the process, when one
    did. `error` explains a `failed` run the code itself did not cause (an image
    that could not start, a clone that failed); it never holds a secret.
    """

    phase: Phase
    kill_reason: KillReason | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    duration_ms: int | None = None

    def __post_init__(self) -> None:
        if not self.phase.terminal:
            raise ValueError(f"a result needs a terminal phase, not {self.phase.value}")
        if (self.phase is Phase.KILLED) != (self.kill_reason is not None):
            raise ValueError("kill_reason is set exactly when the phase is killed")

    @classmethod
    def exited(cls, exit_code: int, duration_ms: int | None = None) -> "SessionResult":
        phase = Phase.SUCCEEDED if exit_code == 0 else Phase.FAILED
        return cls(phase=phase, exit_code=exit_code, duration_ms=duration_ms)

    @classmethod
    def killed(
        cls,
        reason: KillReason,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        duration_ms: int | None = None,
    ) -> "SessionResult":
        return cls(
            phase=Phase.KILLED,
            kill_reason=reason,
            exit_code=exit_code,
            signal=signal,
            duration_ms=duration_ms,
        )

    @classmethod
    def failed(cls, error: str, duration_ms: int | None = None) -> "SessionResult":
        return cls(phase=Phase.FAILED, error=error, duration_ms=duration_ms)

    def replace(self, **changes: Any) -> "SessionResult":
        return dataclasses.replace(self, **changes)
