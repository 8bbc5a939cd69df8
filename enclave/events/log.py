"""The session event log: numbering, storing and publishing events.

Events of a session are numbered 1, 2, 3, … without gaps. A number is taken by
incrementing `session.last_event_seq` in the same transaction that inserts the
event; that UPDATE also checks that the session is still active, so once a
terminal phase is committed nothing more can be appended (a worker's late
output after a DELETE is dropped, not interleaved after the result). The row
lock it takes serialises concurrent writers on PostgreSQL; SQLite's write lock
does the same. Events are published on Redis only after the commit, so a
subscriber never sees an event the log does not hold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import redis

from enclave.db import write_transaction
from enclave.models import Session, SessionEvent, utcnow
from enclave.sessions.spec import ACTIVE_PHASES

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "enclave:events:"


def channel_for(session_id: str) -> str:
    return CHANNEL_PREFIX + session_id


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {"seq": self.seq, "event": self.kind, "data": self.data}, sort_keys=True
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Event":
        message = json.loads(raw)
        return cls(message["seq"], message["event"], message["data"])


def append_events(
    session_id: str,
    events: Iterable[tuple[str, dict[str, Any]]],
    *,
    updates: dict[str, Any] | None = None,
    allowed_phases: Iterable[str] | None = None,
) -> list[Event] | None:
    """Store events and apply `updates` to the session in one transaction.

    Nothing is written, and None returned, when the session's phase is not in
    `allowed_phases` (by default: any active phase).
    """
    return write_events(
        session_id,
        lambda session: list(events),
        updates=updates,
        allowed_phases=allowed_phases,
    )


def write_events(
    session_id: str,
    build,
    *,
    updates: dict[str, Any] | None = None,
    allowed_phases: Iterable[str] | None = None,
) -> list[Event] | None:
    """Like `append_events`, with the events built while the session is locked.

    `build(session)` runs inside the transaction, after the session row is
    locked and re-read, so it can derive events (a result) from a log that no
    other writer can extend meanwhile.
    """
    phases = [str(getattr(p, "value", p)) for p in (allowed_phases or ACTIVE_PHASES)]
    with write_transaction():
        # Claim the lock first with a no-op update, then read what we locked.
        locked = (
            Session.update(last_event_seq=Session.last_event_seq)
            .where((Session.id == session_id) & (Session.phase.in_(phases)))
            .execute()
        )
        if not locked:
            return None
        session = Session.get_by_id(session_id)
        built = list(build(session))
        first = session.last_event_seq + 1
        stored = [Event(first + i, kind, data) for i, (kind, data) in enumerate(built)]
        changes = dict(updates or {})
        changes["last_event_seq"] = session.last_event_seq + len(stored)
        Session.update(**changes).where(Session.id == session_id).execute()
        if stored:
            now = utcnow()
            SessionEvent.insert_many(
                [
                    {
                        "session_id": session_id,
                        "seq": e.seq,
                        "kind": e.kind,
                        "data": e.data,
                        "at": now,
                    }
                    for e in stored
                ]
            ).execute()
    return stored


def publish(client: redis.Redis, session_id: str, events: list[Event]) -> None:
    """Announce stored events; a failure loses nothing, the log still holds them."""
    if not events:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for event in events:
            pipe.publish(channel_for(session_id), event.to_json())
        pipe.execute()
    except redis.RedisError:
        logger.warning(
            "event publish failed session_id=%s seq=%s",
            session_id,
            events[-1].seq,
            exc_info=True,
        )


def stored_events(
    session_id: str, after: int = 0, kinds: Iterable[str] | None = None
) -> list[Event]:
    query = SessionEvent.select().where(
        (SessionEvent.session_id == session_id) & (SessionEvent.seq > after)
    )
    if kinds is not None:
        query = query.where(SessionEvent.kind.in_(list(kinds)))
    return [
        Event(row.seq, row.kind, row.data) for row in query.order_by(SessionEvent.seq)
    ]
