"""Phase transitions of a session, shared by workers, the API and the reaper.

A session moves `queued` → `provisioning` → `running` → one terminal phase,
never backwards. The first terminal phase to commit wins: `finish_session`
returns False to a late caller (a worker finishing after a DELETE, say) and
changes nothing. Finishing stores the `phase` and `result` events and the
audit row in one transaction, then publishes the events.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import redis

from enclave import audit
from enclave.db import write_transaction
from enclave.events.log import Event, publish, stored_events, write_events
from enclave.models import Session, rfc3339, utcnow
from enclave.sessions.spec import Phase, SessionResult

logger = logging.getLogger(__name__)

ORDER = [Phase.QUEUED, Phase.PROVISIONING, Phase.RUNNING]


def advance_phase(client: redis.Redis, session_id: str, phase: Phase) -> bool:
    """Move an active session forward to `phase`; False when it cannot move there."""
    if phase.terminal:
        raise ValueError("terminal phases are reached through finish_session")
    earlier = ORDER[: ORDER.index(phase)]
    now = utcnow()
    updates: dict[str, Any] = {"phase": phase.value}
    if phase is Phase.RUNNING:
        updates["started_at"] = now
    stored = write_events(
        session_id,
        lambda session: [("phase", phase_data(phase, None, now))],
        updates=updates,
        allowed_phases=earlier,
    )
    if stored is None:
        return False
    publish(client, session_id, stored)
    logger.debug("session phase session_id=%s phase=%s", session_id, phase.value)
    return True


def finish_session(
    client: redis.Redis,
    session_id: str,
    result: SessionResult,
    *,
    actor: str,
) -> bool:
    """Record the session's terminal phase and its result, once."""
    now = utcnow()
    finished: dict[str, Any] = {}

    def build(session: Session) -> list[tuple[str, dict[str, Any]]]:
        duration_ms = result.duration_ms
        if duration_ms is None and session.started_at is not None:
            duration_ms = int((now - session.started_at).total_seconds() * 1000)
        finished["session"] = session
        finished["duration_ms"] = duration_ms
        data = result_data(session, result, duration_ms)
        kill_reason = result.kill_reason.value if result.kill_reason else None
        return [
            ("phase", phase_data(result.phase, kill_reason, now)),
            ("result", data),
        ]

    updates = {
        "phase": result.phase.value,
        "kill_reason": result.kill_reason.value if result.kill_reason else None,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "error": result.error,
        "finished_at": now,
    }
    with write_transaction():
        stored = write_events(session_id, build, updates=updates)
        if stored is None:
            return False
        session = finished["session"]
        Session.update(duration_ms=finished["duration_ms"]).where(
            Session.id == session_id
        ).execute()
        action = (
            "session.killed" if result.phase is Phase.KILLED else "session.finished"
        )
        audit.record(
            session_id,
            org_id=session.org_id,
            actor=actor,
            action=action,
            detail={
                "phase": result.phase.value,
                "kill_reason": updates["kill_reason"],
                "exit_code": result.exit_code,
                "duration_ms": finished["duration_ms"],
            },
        )
    publish(client, session_id, stored)
    # The one log line of a session's outcome, whichever process recorded it.
    logger.info(
        "session finished session_id=%s org_id=%s backend=%s phase=%s "
        "kill_reason=%s exit_code=%s signal=%s duration_ms=%s",
        session_id,
        session.org_id,
        session.backend,
        result.phase.value,
        updates["kill_reason"],
        result.exit_code,
        result.signal,
        finished["duration_ms"],
    )
    return True


def phase_data(phase: Phase, kill_reason: str | None, at) -> dict[str, Any]:
    return {"phase": phase.value, "kill_reason": kill_reason, "at": rfc3339(at)}


def result_data(
    session: Session, result: SessionResult, duration_ms: int | None
) -> dict[str, Any]:
    """The public result object, assembled from the session's stored output."""
    output = {"stdout": [], "stderr": []}
    egress: Counter[tuple[str, bool]] = Counter()
    for event in stored_events(session.id, kinds=("stdout", "stderr", "egress")):
        if event.kind == "egress":
            egress[(event.data["host"], bool(event.data["allowed"]))] += 1
        else:
            output[event.kind].append(event.data["data"])
    return {
        "session_id": session.id,
        "phase": result.phase.value,
        "kill_reason": result.kill_reason.value if result.kill_reason else None,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "error": result.error,
        "stdout": "".join(output["stdout"]),
        "stderr": "".join(output["stderr"]),
        "output_truncated": bool(session.output_truncated),
        "duration_ms": duration_ms,
        "egress": [
            {"host": host, "allowed": allowed, "attempts": count}
            for (host, allowed), count in sorted(egress.items())
        ],
    }


def stored_result(session_id: str) -> dict[str, Any] | None:
    found = stored_events(session_id, kinds=("result",))
    return found[-1].data if found else None


__all__ = ["advance_phase", "finish_session", "stored_result", "Event"]
