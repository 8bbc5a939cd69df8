"""The sink a backend reports to while it runs one session.

It turns each report into a numbered, stored, published event and moves the
session's phase. It also holds the session's output cap: stdout and stderr
together may store `output_bytes`; the chunk that crosses the cap is cut at
it, later ones are dropped, and the calls answer False so that the backend
stops the code (`killed`/`output_limit`).

Backends may call it from several threads (one per output pipe): a lock keeps
the numbering in call order, and every write borrows a database connection
for its own duration, because peewee's connections belong to one thread.
"""

from __future__ import annotations

import logging
import threading

import redis

from enclave import audit
from enclave.db import connection
from enclave.events.log import append_events, publish
from enclave.models import rfc3339, utcnow
from enclave.sessions import lifecycle
from enclave.sessions.spec import Phase, SessionResult

logger = logging.getLogger(__name__)


class SessionSink:
    def __init__(
        self,
        client: redis.Redis,
        session_id: str,
        *,
        org_id: str,
        output_bytes: int,
        actor: str = "worker",
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.org_id = org_id
        self.output_bytes = output_bytes
        self.actor = actor
        self.written = 0
        self.truncated = False
        self.finished = False
        self._lock = threading.Lock()

    def phase(self, phase: Phase) -> None:
        with self._lock, connection():
            lifecycle.advance_phase(self.client, self.session_id, phase)

    def stdout(self, chunk: str) -> bool:
        return self._output("stdout", chunk)

    def stderr(self, chunk: str) -> bool:
        return self._output("stderr", chunk)

    def egress(self, host: str, allowed: bool, reason: str | None = None) -> None:
        data = {
            "host": host,
            "allowed": allowed,
            "reason": reason,
            "at": rfc3339(utcnow()),
        }
        with self._lock, connection():
            stored = append_events(self.session_id, [("egress", data)])
            if stored is not None and not allowed:
                audit.record(
                    self.session_id,
                    org_id=self.org_id,
                    actor="egress-proxy",
                    action="egress.denied",
                    detail={"host": host, "reason": reason},
                )
        if stored:
            publish(self.client, self.session_id, stored)

    def result(self, result: SessionResult) -> None:
        with self._lock, connection():
            self.finished = lifecycle.finish_session(
                self.client, self.session_id, result, actor=self.actor
            )

    def _output(self, kind: str, chunk: str) -> bool:
        if not chunk:
            return True
        with self._lock:
            room = self.output_bytes - self.written
            if room <= 0:
                return False
            data = chunk.encode("utf-8", errors="replace")
            fits = len(data) <= room
            # Cut on a character boundary so stored output stays valid UTF-8.
            kept = chunk if fits else data[:room].decode("utf-8", errors="ignore")
            self.written += len(kept.encode("utf-8", errors="replace"))
            updates = None
            if not fits and not self.truncated:
                self.truncated = True
                updates = {"output_truncated": True}
            with connection():
                stored = (
                    append_events(
                        self.session_id, [(kind, {"data": kept})], updates=updates
                    )
                    if kept
                    else append_events(self.session_id, [], updates=updates)
                )
        if stored:
            publish(self.client, self.session_id, stored)
        return fits
