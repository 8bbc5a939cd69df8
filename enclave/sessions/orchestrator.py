"""The orchestrator: the one place where session logic lives.

Views call it and nothing else. Every accessor that takes a session id goes
through `owned_by`, the single point where tenancy is enforced: a session of
another organisation is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import secrets
from typing import Any

import peewee
import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from enclave import audit
from enclave.auth.principal import Principal
from enclave.backends.base import SessionBackend
from enclave.broker import (
    CredentialBroker,
    Entitlement,
    GitSourceRefused,
    validate_ref,
)
from enclave.config import Settings
from enclave.db import write_transaction
from enclave.egress.bindings import binding_config
from enclave.errors import (
    Conflict,
    DependencyUnavailable,
    QuotaExceeded,
    SessionNotFound,
    ValidationFailed,
)
from enclave.events.log import publish, write_events
from enclave.models import IdempotencyKey, Session, rfc3339, utcnow
from enclave.sessions import control, lifecycle
from enclave.sessions.public import public_view
from enclave.sessions.spec import (
    ACTIVE_PHASES,
    TERMINAL_PHASES,
    KillReason,
    Phase,
    SessionResult,
    fill_limits,
    limits_over,
)

logger = logging.getLogger(__name__)

LAUNCH_JOB = "workers.jobs.launch_session"
QUEUED_JOB_TTL_S = 24 * 3600
JOB_TIMEOUT_MARGIN_S = 120
QUOTA_RETRY_AFTER_S = 5


def new_session_id() -> str:
    return "ses_" + secrets.token_hex(12)


class Orchestrator:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        queue: Queue,
        backend: SessionBackend,
        broker: CredentialBroker | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.queue = queue
        self.backend = backend
        self._broker = broker

    @property
    def broker(self) -> CredentialBroker:
        """The credential broker, built from the settings on first use."""
        if self._broker is None:
            self._broker = CredentialBroker.from_settings(self.settings)
        return self._broker

    # -- tenancy ---------------------------------------------------------------

    def owned_by(self, principal: Principal, session_id: str) -> Session:
        """The session, if it belongs to the caller's organisation; else 404."""
        session = Session.get_or_none(
            (Session.id == session_id) & (Session.org_id == principal.org_id)
        )
        if session is None:
            raise SessionNotFound()
        return session

    # -- commands ----------------------------------------------------------------

    def create_session(
        self,
        principal: Principal,
        request: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store, audit and enqueue a new session; (view, created)."""
        self._check_request(request, principal.org_id)
        entitlement = self._check_git_source(request, principal)
        fingerprint = request_fingerprint(request)
        if idempotency_key is not None:
            earlier = self._replay_idempotent(principal, idempotency_key, fingerprint)
            if earlier is not None:
                return public_view(earlier), False
        self._check_quota(principal)

        limits = fill_limits(request.get("limits") or {}, self.settings.default_limits)
        session_id = new_session_id()
        now = utcnow()
        try:
            with write_transaction():
                session = Session.create(
                    id=session_id,
                    org_id=principal.org_id,
                    created_by=principal.subject,
                    language=request["language"],
                    code=request["code"],
                    stdin=request.get("stdin"),
                    phase=Phase.QUEUED.value,
                    limits=limits.to_dict(),
                    egress={
                        "allow": list((request.get("egress") or {}).get("allow", []))
                    },
                    service_bindings=list(request.get("service_bindings") or []),
                    source=request.get("source"),
                    metadata=dict(request.get("metadata") or {}),
                    backend=self.backend.name,
                    created_at=now,
                )
                if idempotency_key is not None:
                    IdempotencyKey.create(
                        org_id=principal.org_id,
                        key=idempotency_key,
                        fingerprint=fingerprint,
                        session_id=session_id,
                        created_at=now,
                    )
                audit.record(
                    session_id,
                    org_id=principal.org_id,
                    actor=principal.subject,
                    action="session.created",
                    detail={
                        "language": session.language,
                        "backend": session.backend,
                        "limits": session.limits,
                        "egress": session.egress,
                        "service_bindings": session.service_bindings,
                        "source": entitlement.audit_detail() if entitlement else None,
                    },
                )
                stored = write_events(
                    session_id,
                    lambda s: [
                        ("phase", lifecycle.phase_data(Phase.QUEUED, None, now))
                    ],
                )
        except peewee.IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race.
            earlier = self._replay_idempotent(principal, idempotency_key, fingerprint)
            if earlier is None:
                raise
            return public_view(earlier), False

        publish(self.redis, session_id, stored or [])
        self._enqueue(session, limits.timeout_s)
        logger.info(
            "session queued session_id=%s org_id=%s language=%s backend=%s",
            session_id,
            principal.org_id,
            session.language,
            session.backend,
        )
        return public_view(session), True

    def teardown(self, principal: Principal, session_id: str) -> dict[str, Any]:
        """Stop the session if it still runs, then reclaim what the backend holds."""
        session = self.owned_by(principal, session_id)
        if session.phase not in TERMINAL_PHASES:
            if session.phase == Phase.QUEUED.value:
                self._cancel_job(session_id)
            lifecycle.finish_session(
                self.redis,
                session_id,
                SessionResult.killed(KillReason.TEARDOWN),
                actor=principal.subject,
            )
            # Whatever phase won, the worker must stop running the code.
            control.request_stop(self.redis, session_id)
        self.reclaim(session_id, actor=principal.subject)
        return public_view(Session.get_by_id(session_id))

    def reclaim(self, session_id: str, *, actor: str) -> bool:
        """Have the backend release everything of a finished session, once."""
        session = Session.get_by_id(session_id)
        if session.torn_down_at is not None:
            return False
        self.backend.teardown(session_id)
        with write_transaction():
            updated = (
                Session.update(torn_down_at=utcnow())
                .where((Session.id == session_id) & Session.torn_down_at.is_null())
                .execute()
            )
            if updated:
                audit.record(
                    session_id,
                    org_id=session.org_id,
                    actor=actor,
                    action="session.torn_down",
                    detail={"backend": session.backend},
                )
        return bool(updated)

    # -- queries -----------------------------------------------------------------

    def get_session(self, principal: Principal, session_id: str) -> dict[str, Any]:
        return public_view(self.owned_by(principal, session_id))

    def list_sessions(
        self,
        principal: Principal,
        *,
        limit: int = 20,
        cursor: str | None = None,
        phase: str | None = None,
    ) -> dict[str, Any]:
        query = Session.select().where(Session.org_id == principal.org_id)
        if phase is not None:
            query = query.where(Session.phase == phase)
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            query = query.where(
                (Session.created_at < created_at)
                | ((Session.created_at == created_at) & (Session.id < last_id))
            )
        rows = list(
            query.order_by(Session.created_at.desc(), Session.id.desc()).limit(
                limit + 1
            )
        )
        page, more = rows[:limit], len(rows) > limit
        return {
            "sessions": [public_view(s) for s in page],
            "next_cursor": encode_cursor(page[-1]) if more else None,
        }

    def get_result(self, principal: Principal, session_id: str) -> dict[str, Any]:
        session = self.owned_by(principal, session_id)
        result = (
            lifecycle.stored_result(session.id)
            if session.phase in TERMINAL_PHASES
            else None
        )
        if result is None:
            raise Conflict(f"The session is {session.phase}; its result is not ready.")
        return result

    def get_audit(self, principal: Principal, session_id: str) -> dict[str, Any]:
        session = self.owned_by(principal, session_id)
        return {
            "events": [
                {
                    "seq": row.seq,
                    "at": rfc3339(row.at),
                    "actor": row.actor,
                    "action": row.action,
                    "detail": row.detail,
                    "hash": row.hash,
                }
                for row in audit.events(session.id)
            ]
        }

    def stream_position(self, principal: Principal, session_id: str) -> Session:
        """The session an SSE client may follow (tenancy checked here too)."""
        return self.owned_by(principal, session_id)

    # -- inner steps -------------------------------------------------------------

    def _check_request(self, request: dict[str, Any], org_id: str) -> None:
        errors: dict[str, Any] = {}
        if len(request["code"].encode()) > self.settings.max_code_bytes:
            errors["code"] = [f"Must be at most {self.settings.max_code_bytes} bytes."]
        stdin = request.get("stdin")
        if stdin is not None and len(stdin.encode()) > self.settings.max_stdin_bytes:
            errors["stdin"] = [
                f"Must be at most {self.settings.max_stdin_bytes} bytes."
            ]
        over = limits_over(request.get("limits") or {}, self.settings.max_limits)
        if over:
            errors["limits"] = over
        bindings = request.get("service_bindings") or []
        if bindings:
            # Names only: a binding's value is the egress proxy's business.
            known = binding_config(self.settings).names(org_id)
            unknown = [name for name in bindings if name not in known]
            if unknown:
                errors["service_bindings"] = [
                    f"Unknown service binding {name!r}." for name in unknown
                ]
        if request.get("source") and not self.broker.enabled:
            errors["source"] = ["Git sources are not enabled on this deployment."]
        if errors:
            raise ValidationFailed(
                "The session request is not valid.", errors={"json": errors}
            )

    def _check_git_source(
        self, request: dict[str, Any], principal: Principal
    ) -> Entitlement | None:
        """The org's entitlement to the requested repository; refusals audited.

        Nothing is minted here: the token is issued by the worker right before
        the clone. A refusal reads the same whether the repository exists or
        not, and lands on the org's own audit chain (there is no session yet).
        """
        git = (request.get("source") or {}).get("git")
        if not git:
            return None
        validate_ref(git.get("ref"))
        try:
            return self.broker.check_entitlement(principal.org_id, git["url"])
        except GitSourceRefused as exc:
            audit.record(
                f"org:{principal.org_id}",
                org_id=principal.org_id,
                actor=principal.subject,
                action="git_source.refused",
                detail=exc.audit_detail(),
            )
            raise

    def _replay_idempotent(
        self, principal: Principal, key: str, fingerprint: str
    ) -> Session | None:
        row = IdempotencyKey.get_or_none(
            (IdempotencyKey.org_id == principal.org_id) & (IdempotencyKey.key == key)
        )
        if row is None:
            return None
        expired = utcnow() - row.created_at > dt.timedelta(
            seconds=self.settings.idempotency_ttl_s
        )
        if expired:
            row.delete_instance()
            return None
        if row.fingerprint != fingerprint:
            raise Conflict(
                "This Idempotency-Key was used with a different request body."
            )
        return Session.get_by_id(row.session_id)

    def _check_quota(self, principal: Principal) -> None:
        active = (
            Session.select()
            .where(
                (Session.org_id == principal.org_id)
                & Session.phase.in_([p.value for p in ACTIVE_PHASES])
            )
            .count()
        )
        if active >= self.settings.max_active_sessions_per_org:
            raise QuotaExceeded(
                f"The organisation has {active} unfinished sessions, the most allowed.",
                retry_after_s=QUOTA_RETRY_AFTER_S,
            )

    def _enqueue(self, session: Session, timeout_s: float) -> None:
        try:
            self.queue.enqueue(
                LAUNCH_JOB,
                session.id,
                job_id=session.id,
                job_timeout=int(timeout_s) + JOB_TIMEOUT_MARGIN_S,
                ttl=QUEUED_JOB_TTL_S,
                result_ttl=3600,
                failure_ttl=24 * 3600,
            )
        except redis.RedisError as exc:
            # The session was stored; end it honestly rather than leave it queued forever.
            logger.error("enqueue failed session_id=%s", session.id, exc_info=True)
            lifecycle.finish_session(
                self.redis,
                session.id,
                SessionResult.failed(
                    "The session could not be queued: the job queue is unavailable."
                ),
                actor="control-plane",
            )
            raise DependencyUnavailable("The job queue is unavailable.") from exc

    def _cancel_job(self, session_id: str) -> None:
        try:
            job = Job.fetch(session_id, connection=self.redis)
        except NoSuchJobError:
            return
        try:
            job.cancel()
        except Exception:  # noqa: BLE001 - a job already taken cannot be cancelled; the phase check stops it
            logger.debug("job cancel declined session_id=%s", session_id, exc_info=True)


def request_fingerprint(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_cursor(session: Session) -> str:
    raw = json.dumps([session.created_at.isoformat(), session.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, session_id = json.loads(base64.urlsafe_b64decode(padded))
        return dt.datetime.fromisoformat(created_at), str(session_id)
    except (ValueError, TypeError, binascii.Error):
        raise ValidationFailed(
            "The cursor is not one this service issued.",
            errors={"cursor": ["Not a cursor from a previous page."]},
        ) from None
