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
4. A session with a git source also gets, before the backend is called, a
   path out for its clone step alone (a second `SessionEgress` under the id
   `<session_id>-clone`, whose policy allows the repository's host and
   nothing else, with a proxy token of its own) and, for a private
   repository, a token from the credential broker (audited as
   `credential.issued`, by fingerprint). Both reach the backend through
   `launch(..., credentials=SessionCredentials(...))`, never through the
   `LaunchSpec`. As soon as the backend reports `running` (the clone is
   over) or a result (the clone failed), the token is revoked (audited as
   `credential.revoked`) and the clone's policy, bridge and directory are
   removed. A token that cannot be issued, or a clone path that cannot be
   prepared, fails the session without running anything.
5. Whatever happens, the session ends with a result: a backend that raises or
   returns without one leaves it `failed` with a generic error.
6. Remove the egress policy, bridge and directory as soon as the backend
   returns, then release what the backend holds (`Orchestrator.reclaim`)
   and the lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Self
from urllib.parse import unquote, urlsplit

import redis

from enclave import audit
from enclave.backends.base import CLONE_EGRESS_SUFFIX
from enclave.backends.k8s_objects import ProxyCredentials, SessionCredentials
from enclave.broker import (
    CredentialError,
    GitCredential,
    GitSourceRefused,
    ProviderUnavailable,
)
from enclave.db import connection
from enclave.egress.sandbox import ENVIRONMENT_FILE, EgressUnavailable, SessionEgress
from enclave.events.sink import SessionSink
from enclave.models import Session, utcnow
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
# A brokered token outlives the session's own deadline by this much at most,
# should the revocation after the clone never happen (its timer revokes it).
TOKEN_TTL_MARGIN_S = 60


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
            _run_session(rt, spec, sink)
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


class PreparationFailed(Exception):
    """The session cannot run; the message is its `error` and holds no secret."""


def _run_session(rt, spec: LaunchSpec, sink: SessionSink) -> None:
    """Run the session inside its path out and, with a source, its clone's."""
    with contextlib.ExitStack() as held:
        try:
            proxy = None
            if spec.egress.allow:
                egress = held.enter_context(_open_egress(rt, spec))
                proxy = _proxy_credentials(egress)
            credentials = SessionCredentials(proxy=proxy)
            if spec.source is not None:
                clone = held.enter_context(_CloneAccess.open(rt, spec))
                credentials = dataclasses.replace(
                    credentials,
                    clone_proxy=_proxy_credentials(clone.egress),
                    git_token=clone.credential.token if clone.credential else None,
                )
                sink = _CloneWatch(sink, clone.finish)
        except PreparationFailed as exc:
            sink.result(SessionResult.failed(str(exc)))
            return
        except Exception:  # noqa: BLE001 - a session that cannot start must still end
            logger.exception("session not prepared session_id=%s", spec.session_id)
            sink.result(
                SessionResult.failed("The session could not be prepared to run.")
            )
            return
        # Closed before the backend's resources are reclaimed: from here on the
        # session's proxy tokens are refused and its bridges are gone.
        _run_on_backend(rt, spec, sink, credentials)


def _open_egress(rt, spec: LaunchSpec, report_to: str | None = None) -> SessionEgress:
    try:
        return SessionEgress.open(rt.settings, rt.redis, spec, report_to)
    except EgressUnavailable as exc:
        logger.warning(
            "egress unavailable session_id=%s error=%s", spec.session_id, exc
        )
        raise PreparationFailed(str(exc)) from exc
    except (OSError, redis.RedisError) as exc:
        logger.exception("egress not prepared session_id=%s", spec.session_id)
        raise PreparationFailed(
            "The session's network access could not be prepared."
        ) from exc


def _proxy_credentials(egress: SessionEgress) -> ProxyCredentials:
    """The proxy user and token `egress` wrote for its sandbox.

    Read back from the environment file rather than kept anywhere else: the
    token exists there, in this process's memory and in the sandbox only.
    """
    environment = json.loads((egress.directory / ENVIRONMENT_FILE).read_text())
    url = urlsplit(environment["HTTPS_PROXY"])
    return ProxyCredentials(unquote(url.username or ""), unquote(url.password or ""))


class _CloneAccess:
    """The clone step's own path out and its token, from issue to revocation.

    Lifecycle: `open` prepares the clone-only egress (its policy allows the
    repository's host alone) and then asks the broker for a token, so that
    no token is minted for a clone that could not go out anyway. `finish`,
    called once the clone is over, revokes the token and closes the clone's
    egress; it is idempotent and also runs when the job leaves the block.
    """

    def __init__(self, rt, spec: LaunchSpec, egress: SessionEgress) -> None:
        self.rt = rt
        self.spec = spec
        self.egress = egress
        self.credential: GitCredential | None = None
        self._finished = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, rt, spec: LaunchSpec) -> _CloneAccess:
        host = urlsplit(spec.source.url).hostname or ""
        clone_spec = dataclasses.replace(
            spec,
            session_id=spec.session_id + CLONE_EGRESS_SUFFIX,
            egress=EgressPolicy(allow=(host,)),
            service_bindings=(),
        )
        # The clone's attempts are the session's: they go to its event log.
        access = cls(rt, spec, _open_egress(rt, clone_spec, report_to=spec.session_id))
        try:
            access._issue()
        except BaseException:
            access.finish()
            raise
        return access

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.finish()

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            if self.credential is not None:
                self._revoke()
        finally:
            self.egress.close()

    def _issue(self) -> None:
        spec = self.spec
        broker = self.rt.orchestrator.broker
        try:
            self.credential = broker.issue_git_token(
                spec.session_id,
                spec.org_id,
                spec.source.url,
                ttl_seconds=spec.limits.timeout_s + TOKEN_TTL_MARGIN_S,
            )
        except (GitSourceRefused, CredentialError, ProviderUnavailable) as exc:
            logger.warning(
                "git credential not issued session_id=%s org_id=%s error=%s",
                spec.session_id,
                spec.org_id,
                exc.message,
            )
            raise PreparationFailed(
                f"no credential for the git source: {exc.message}"
            ) from exc
        if self.credential is not None:
            with connection():
                audit.record(
                    spec.session_id,
                    org_id=spec.org_id,
                    actor="worker",
                    action="credential.issued",
                    detail=self.credential.audit_detail(),
                )

    def _revoke(self) -> None:
        spec = self.spec
        revoked = self.rt.orchestrator.broker.revoke_git_token(self.credential)
        if not revoked:
            # Logged by the broker; the token still dies at its expiry.
            return
        try:
            with connection():
                audit.record(
                    spec.session_id,
                    org_id=spec.org_id,
                    actor="worker",
                    action="credential.revoked",
                    detail=self.credential.revocation_detail(utcnow()),
                )
        except Exception:  # noqa: BLE001 - the token is revoked; only the row is missing
            logger.warning(
                "credential revocation not audited session_id=%s",
                spec.session_id,
                exc_info=True,
            )


class _CloneWatch:
    """A sink that tells when the clone step is over, passing everything on.

    Every backend reports `running` once the workload starts, which is after
    the clone; a result before that means the clone (or the sandbox) failed.
    Either way the clone's token and path out are no longer needed.
    """

    def __init__(self, sink: SessionSink, on_clone_over) -> None:
        self._sink = sink
        self._on_clone_over = on_clone_over

    @property
    def finished(self) -> bool:
        return self._sink.finished

    def phase(self, phase: Phase) -> None:
        if phase is Phase.RUNNING:
            self._on_clone_over()
        self._sink.phase(phase)

    def stdout(self, chunk: str) -> bool:
        return self._sink.stdout(chunk)

    def stderr(self, chunk: str) -> bool:
        return self._sink.stderr(chunk)

    def egress(self, host: str, allowed: bool, reason: str | None = None) -> None:
        self._sink.egress(host, allowed, reason)

    def result(self, result: SessionResult) -> None:
        self._on_clone_over()
        self._sink.result(result)


def _run_on_backend(
    rt, spec: LaunchSpec, sink: SessionSink, credentials: SessionCredentials
) -> None:
    try:
        rt.backend.launch(spec, sink, credentials=credentials)
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
