"""The launch job: runs one session on the backend, start to finish.

Lifecycle, in the RQ work horse:
0. Bind this process to the worker's life (`bind_to_worker`).
1. Load the session; a session no longer `queued` (a DELETE won the race) is
   left alone.
2. Take the lease (see `workers.lease`), so that the reaper can tell a live
   worker from a dead one, and listen for stop requests.
3. Move to `provisioning`, audit `session.launched`, build the `LaunchSpec`
   and hand it to the backend with a `SessionSink`. A session with a
   non-empty `egress.allow` first gets its path out
   (`enclave.egress.sandbox.SessionEgress`: its directory, the bridge to the
   egress proxy and its policy in Redis), which the backend mounts; when
   that cannot be prepared the session fails without running.
4. Whatever happens, the session ends with a result: a backend that raises or
   returns without one leaves it `failed` with a generic error.
5. Remove the egress policy, bridge and directory as soon as the backend
   returns, then release what the backend holds (`Orchestrator.reclaim`)
   and the lease.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import redis

from enclave import audit
from enclave.db import connection
from enclave.egress.sandbox import EgressUnavailable, SessionEgress
from enclave.events.sink import SessionSink
from enclave.models import Session
from enclave.sessions.spec import (
    TERMINAL_PHASES,
    EgressPolicy,
    GitSource,
    LaunchSpec,
    Limits,
    Phase,
    SessionResult,
)
from workers.lease import SessionLease
from workers.runtime import runtime

logger = logging.getLogger(__name__)

TERMINAL_VALUES = {phase.value for phase in TERMINAL_PHASES}


PR_SET_PDEATHSIG = 1


def bind_to_worker() -> None:
    """Die with the worker process that forked this work horse.

    RQ puts the horse in a session of its own, so a worker killed outright
    would leave it running a session nobody supervises. Dying with it lets the
    reaper report the truth (`worker_lost`) and the sandbox, which dies with
    its parent, go too.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning(
            "could not bind the job to its worker errno=%s", ctypes.get_errno()
        )
        return
    if os.getppid() != parent:
        # The worker died between the fork and the prctl call.
        os._exit(1)


def build_spec(session: Session) -> LaunchSpec:
    git = (session.source or {}).get("git")
    return LaunchSpec(
        session_id=session.id,
        code=session.code,
        language=session.language,
        limits=Limits.from_dict(session.limits),
        egress=EgressPolicy(allow=tuple(session.egress.get("allow", []))),
        service_bindings=tuple(session.service_bindings),
        stdin=session.stdin,
        source=GitSource(url=git["url"], ref=git.get("ref")) if git else None,
        org_id=session.org_id,
    )


def launch_session(session_id: str) -> None:
    bind_to_worker()
    rt = runtime()
    with connection():
        session = Session.get_or_none(Session.id == session_id)
        if session is None or session.phase != Phase.QUEUED.value:
            logger.info(
                "launch skipped session_id=%s phase=%s",
                session_id,
                session.phase if session else None,
            )
            return
        spec = build_spec(session)

    sink = SessionSink(
        rt.redis,
        session_id,
        org_id=spec.org_id,
        output_bytes=spec.limits.output_bytes,
    )
    lease = SessionLease(
        rt.redis,
        session_id,
        ttl_s=rt.settings.lease_ttl_s,
        heartbeat_s=rt.settings.heartbeat_s,
        on_stop=lambda: rt.backend.teardown(session_id),
    )
    try:
        with lease:
            sink.phase(Phase.PROVISIONING)
            with connection():
                current = Session.get_by_id(session_id)
                if current.phase != Phase.PROVISIONING.value:
                    return
                audit.record(
                    session_id,
                    org_id=spec.org_id,
                    actor="worker",
                    action="session.launched",
                    detail={"backend": rt.backend.name},
                )
            logger.info(
                "session started session_id=%s org_id=%s backend=%s",
                session_id,
                spec.org_id,
                rt.backend.name,
            )
            _run_with_egress(rt, spec, sink)
    finally:
        _reclaim(rt, session_id)


def _reclaim(rt, session_id: str) -> None:
    """Release the backend's hold on a finished session; the reaper retries failures."""
    try:
        with connection():
            if Session.get_by_id(session_id).phase in TERMINAL_VALUES:
                rt.orchestrator.reclaim(session_id, actor="worker")
    except Exception:  # noqa: BLE001 - the session's outcome is recorded already
        logger.warning("reclaim failed session_id=%s", session_id, exc_info=True)


def _run_with_egress(rt, spec: LaunchSpec, sink: SessionSink) -> None:
    """Run the session, inside its path out when it has an allow-list."""
    if not spec.egress.allow:
        _run_on_backend(rt, spec, sink)
        return

    try:
        egress = SessionEgress.open(rt.settings, rt.redis, spec)
    except EgressUnavailable as exc:
        logger.warning(
            "egress unavailable session_id=%s error=%s", spec.session_id, exc
        )
        sink.result(SessionResult.failed(str(exc)))
        return
    except (OSError, redis.RedisError):
        logger.exception("egress not prepared session_id=%s", spec.session_id)
        sink.result(
            SessionResult.failed("The session's network access could not be prepared.")
        )
        return
    # Closed before the backend's resources are reclaimed: from here on the
    # session's token is refused and its bridge is gone.
    with egress:
        _run_on_backend(rt, spec, sink)


def _run_on_backend(rt, spec: LaunchSpec, sink: SessionSink) -> None:
    try:
        rt.backend.launch(spec, sink)
    except Exception:  # noqa: BLE001 - any backend failure must still end the session
        logger.error(
            "backend failed session_id=%s backend=%s",
            spec.session_id,
            rt.backend.name,
            exc_info=True,
        )
        if not sink.finished:
            sink.result(
                SessionResult.failed("The sandbox backend failed to run the session.")
            )
        return
    if not sink.finished:
        # The backend returned without a result, or a DELETE already ended the
        # session; finishing is a no-op in the second case.
        sink.result(SessionResult.failed("The sandbox backend ended without a result."))
