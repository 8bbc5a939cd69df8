"""The interface every sandbox backend implements, and the sink it reports to.

A backend's `launch` runs in an RQ worker and blocks until the session ends. It
reports through the sink, in this order: `phase(PROVISIONING)`, `phase(RUNNING)`,
any number of `stdout`/`stderr`/`egress` calls, and exactly one `result`, which
carries the terminal phase. `launch` must call `result` even when the code never
started (with `SessionResult.failed(...)`); if it raises instead, the worker
records the session as failed.

`launch` also takes `credentials`, a `SessionCredentials` (see
`enclave.backends.k8s_objects`) holding the secrets of the launch, which a
`LaunchSpec` never carries: the workload's proxy credentials and, for a
session with a git source, the clone step's proxy credentials and the
brokered git token. A backend runs the clone step apart from the workload,
before it, with the token visible to the clone step alone and the checkout
as the only thing the two share; the clone counts against the session's
`timeout_s` and `disk_mb`, and `phase(RUNNING)` is reported only once the
clone is over (the worker revokes the token then). On `local` and `docker`
the clone step's egress directory is the one the worker prepared under the
id `<session_id>` + `CLONE_EGRESS_SUFFIX`, the `clone_proxy` user name.

`teardown(session_id)` stops whatever still runs for the session and reclaims
everything the backend holds for it. It is idempotent, may be called from a
process other than the one that launched the session, and may race with
`launch` finishing on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from enclave.sessions.spec import LaunchSpec, Phase, SessionResult

if TYPE_CHECKING:
    from enclave.backends.k8s_objects import SessionCredentials

# The clone step's egress id is the session's with this suffix.
CLONE_EGRESS_SUFFIX = "-clone"


class BackendEventSink(Protocol):
    def phase(self, phase: Phase) -> None:
        """Report a non-terminal phase; terminal ones arrive through `result`."""

    def stdout(self, chunk: str) -> bool:
        """Record output; False once the session's `output_bytes` cap is reached."""

    def stderr(self, chunk: str) -> bool:
        """Like `stdout`, for the error stream; both count against one cap."""

    def egress(self, host: str, allowed: bool, reason: str | None = None) -> None: ...

    def result(self, result: SessionResult) -> None: ...


@dataclass(frozen=True)
class BackendHealth:
    ok: bool
    detail: str = ""


@runtime_checkable
class SessionBackend(Protocol):
    name: str

    def launch(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        *,
        credentials: SessionCredentials | None = None,
    ) -> None: ...

    def teardown(self, session_id: str) -> None: ...

    def health(self) -> BackendHealth: ...
