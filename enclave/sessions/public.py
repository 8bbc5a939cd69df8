"""The API's session object, built only from fields that cannot hold a secret.

`SessionView` names every field a client may see. It is filled field by
field from the stored session, never by copying the row, so a column added
later (a token fingerprint, the code itself) cannot reach a response by
accident.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from enclave.models import Session, rfc3339


@dataclass(frozen=True)
class SessionView:
    id: str
    org_id: str
    created_by: str
    language: str
    phase: str
    kill_reason: str | None
    exit_code: int | None
    error: str | None
    limits: dict[str, Any]
    egress: dict[str, Any]
    service_bindings: list[str]
    source: dict[str, Any] | None
    metadata: dict[str, str]
    backend: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    torn_down_at: str | None


def public_view(session: Session) -> dict[str, Any]:
    view = SessionView(
        id=session.id,
        org_id=session.org_id,
        created_by=session.created_by,
        language=session.language,
        phase=session.phase,
        kill_reason=session.kill_reason,
        exit_code=session.exit_code,
        error=session.error,
        limits=dict(session.limits),
        egress={"allow": list(session.egress.get("allow", []))},
        service_bindings=list(session.service_bindings),
        source=_public_source(session.source),
        metadata=dict(session.metadata),
        backend=session.backend,
        created_at=rfc3339(session.created_at),
        started_at=rfc3339(session.started_at),
        finished_at=rfc3339(session.finished_at),
        torn_down_at=rfc3339(session.torn_down_at),
    )
    return dataclasses.asdict(view)


def _public_source(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """Only the repository URL and ref: never credentials someone put in a URL."""
    if not source or "git" not in source:
        return None
    git = source["git"]
    return {"git": {"url": git.get("url"), "ref": git.get("ref")}}
