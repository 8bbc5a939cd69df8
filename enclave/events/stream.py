"""The SSE body of `GET /sessions/{id}/stream`.

Lifecycle of one client: register with the process's `EventRelay`, replay
the stored events after `after`, then relay live ones in sequence order,
filling any gap (a message lost or overtaken) from the event log, with a
`: keepalive` comment whenever the session is quiet. The stream ends after
the `result` event, or at once when the replay shows the session finished
before the client's position. A database connection is held only while
reading the log, never while waiting.
"""

from __future__ import annotations

import json
import logging
from typing import Iterator

from enclave.db import connection
from enclave.events.log import Event, stored_events
from enclave.events.relay import RESYNC, EventRelay
from enclave.models import Session
from enclave.sessions.spec import TERMINAL_PHASES

logger = logging.getLogger(__name__)

RETRY_MS = 2000


def format_event(event: Event) -> str:
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(event.data, sort_keys=True)}\n\n"


def event_stream(
    relay: EventRelay, session_id: str, *, after: int, keepalive_s: float
) -> Iterator[str]:
    with relay.watch(session_id) as watcher:
        yield f"retry: {RETRY_MS}\n\n"
        last = after
        pending, finished = _read_log(session_id, last)
        for event in pending:
            yield format_event(event)
            last = event.seq
            if event.kind == "result":
                return
        if finished:
            return

        while True:
            item = watcher.get(timeout=keepalive_s)
            if item is None:
                yield ": keepalive\n\n"
                continue
            if item is RESYNC or item.seq > last + 1:
                batch, _ = _read_log(session_id, last)
            elif item.seq <= last:
                continue
            else:
                batch = [item]
            for event in batch:
                yield format_event(event)
                last = event.seq
                if event.kind == "result":
                    return


def _read_log(session_id: str, after: int) -> tuple[list[Event], bool]:
    """Stored events after `after`, and whether the session can emit no more."""
    with connection():
        events = stored_events(session_id, after=after)
        session = Session.get_by_id(session_id)
        done = session.phase in {p.value for p in TERMINAL_PHASES} and (
            session.last_event_seq <= after + len(events)
        )
    return events, done
