"""A sink that records what a backend reports, for tests of one backend alone.

It applies the same output cap as the real sink (`enclave.events.sink`): once
stdout and stderr together reach `output_bytes`, the chunk that crosses the cap
is cut and later ones are refused, and the calls answer False.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from enclave.sessions.spec import Phase, SessionResult


@dataclass
class RecordingSink:
    output_bytes: int = 1024 * 1024
    events: list[tuple[str, object, float]] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    _written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def phase(self, phase: Phase) -> None:
        assert not phase.terminal, "terminal phases arrive through result()"
        self._record("phase", phase)

    def stdout(self, chunk: str) -> bool:
        return self._output("stdout", chunk)

    def stderr(self, chunk: str) -> bool:
        return self._output("stderr", chunk)

    def egress(self, host: str, allowed: bool, reason: str | None = None) -> None:
        self._record("egress", (host, allowed, reason))

    def result(self, result: SessionResult) -> None:
        assert self.result_value is None, "result() called twice"
        self._record("result", result)
        self.finished.set()

    @property
    def phases(self) -> list[Phase]:
        return [value for kind, value, _ in self.events if kind == "phase"]

    @property
    def stdout_text(self) -> str:
        return "".join(value for kind, value, _ in self.events if kind == "stdout")

    @property
    def stderr_text(self) -> str:
        return "".join(value for kind, value, _ in self.events if kind == "stderr")

    @property
    def result_value(self) -> SessionResult | None:
        found = [value for kind, value, _ in self.events if kind == "result"]
        return found[0] if found else None

    def first_time(self, kind: str) -> float | None:
        times = [at for k, _, at in self.events if k == kind]
        return times[0] if times else None

    def _output(self, kind: str, chunk: str) -> bool:
        with self._lock:
            room = self.output_bytes - self._written
            data = chunk.encode()
            if room <= 0:
                return False
            kept = data[:room].decode(errors="ignore")
            self._written += len(kept.encode())
        if kept:
            self._record(kind, kept)
        return len(data) <= room

    def _record(self, kind: str, value: object) -> None:
        self.events.append((kind, value, time.monotonic()))
