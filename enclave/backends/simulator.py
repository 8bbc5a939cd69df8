"""The simulator backend: runs nothing, behaves like a backend.

It drives a session through the same phases, output and results a real
sandbox would, from directives in the code, so that the control plane can be
tested and load-tested without a sandbox. One directive per line, after
`#sim` (Python) or `//sim` (Node):

    stdout <text>     print a line on stdout        sleep <seconds>   wait
    stderr <text>     print a line on stderr        exit <code>       end with this code
    echo-stdin        copy stdin to stdout          oom               end as killed/memory
    flood <bytes>     print that much, in chunks, until done or capped

Code without directives prints one line and exits 0. `timeout_s` and
teardown interrupt a sleep exactly as they would stop real code.
"""

from __future__ import annotations

import logging
import threading
import time

from enclave.backends.base import BackendEventSink, BackendHealth
from enclave.sessions.spec import KillReason, LaunchSpec, Phase, SessionResult

logger = logging.getLogger(__name__)

PREFIXES = ("#sim", "//sim")
FLOOD_CHUNK = 8192


class SimulatorBackend:
    name = "simulator"

    def __init__(self, settings) -> None:
        self.step_s = settings.simulator_step_s
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def launch(
        self, spec: LaunchSpec, sink: BackendEventSink, *, credentials=None
    ) -> None:
        # `credentials` is accepted as the protocol asks and left unused: the
        # simulator clones nothing and opens no network.
        with self._lock:
            stop = self._stops.setdefault(spec.session_id, threading.Event())
        try:
            sink.phase(Phase.PROVISIONING)
            if stop.wait(self.step_s):
                sink.result(SessionResult.killed(KillReason.TEARDOWN))
                return
            sink.phase(Phase.RUNNING)
            sink.result(self._run(spec, sink, stop))
        finally:
            with self._lock:
                self._stops.pop(spec.session_id, None)

    def teardown(self, session_id: str) -> None:
        with self._lock:
            stop = self._stops.get(session_id)
        if stop is not None:
            stop.set()

    def health(self) -> BackendHealth:
        return BackendHealth(
            True, "simulator: scripted phases and output, runs no code"
        )

    def _run(
        self, spec: LaunchSpec, sink: BackendEventSink, stop: threading.Event
    ) -> SessionResult:
        started = time.monotonic()
        deadline = started + spec.limits.timeout_s

        def elapsed_ms() -> int:
            return int((time.monotonic() - started) * 1000)

        directives = parse_directives(spec.code)
        if not directives:
            directives = [("stdout", f"simulated {spec.language} run")]
        for verb, argument in directives:
            if verb == "sleep":
                wait_s = min(float(argument or 0), max(deadline - time.monotonic(), 0))
                if stop.wait(wait_s):
                    return SessionResult.killed(
                        KillReason.TEARDOWN, duration_ms=elapsed_ms()
                    )
                if time.monotonic() >= deadline:
                    return SessionResult.killed(
                        KillReason.TIMEOUT, duration_ms=elapsed_ms()
                    )
            elif verb in ("stdout", "stderr"):
                if not getattr(sink, verb)(argument + "\n"):
                    return SessionResult.killed(
                        KillReason.OUTPUT_LIMIT, duration_ms=elapsed_ms()
                    )
            elif verb == "echo-stdin":
                if spec.stdin and not sink.stdout(spec.stdin):
                    return SessionResult.killed(
                        KillReason.OUTPUT_LIMIT, duration_ms=elapsed_ms()
                    )
            elif verb == "flood":
                remaining = int(argument or 0)
                while remaining > 0:
                    size = min(FLOOD_CHUNK, remaining)
                    if not sink.stdout("x" * size):
                        return SessionResult.killed(
                            KillReason.OUTPUT_LIMIT, duration_ms=elapsed_ms()
                        )
                    remaining -= size
            elif verb == "oom":
                return SessionResult.killed(
                    KillReason.MEMORY, signal=9, duration_ms=elapsed_ms()
                )
            elif verb == "exit":
                return SessionResult.exited(
                    int(argument or 0), duration_ms=elapsed_ms()
                )
            if stop.is_set():
                return SessionResult.killed(
                    KillReason.TEARDOWN, duration_ms=elapsed_ms()
                )
        return SessionResult.exited(0, duration_ms=elapsed_ms())


def parse_directives(code: str) -> list[tuple[str, str]]:
    """The `#sim`/`//sim` lines of `code` as (verb, argument) pairs."""
    found = []
    for line in code.splitlines():
        stripped = line.strip()
        for prefix in PREFIXES:
            if stripped.startswith(prefix + " "):
                words = stripped[len(prefix) :].strip()
                verb, _, argument = words.partition(" ")
                found.append((verb, argument))
                break
    return found
