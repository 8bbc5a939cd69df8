"""The reaper: ends sessions whose worker died, and reclaims what they left.

`python -m workers.reaper` runs a loop; one reaper at a time does the work,
others wait on a Redis lock, so running one beside each worker is safe.
Each pass:

1. A session in `provisioning` or `running` whose lease (see `workers.lease`)
   has been missing for a full lease TTL is ended as `killed`/`worker_lost`.
   Waiting one TTL after first noticing tolerates a Redis restart, after
   which live workers re-create their leases within one heartbeat.
2. A queued session whose RQ job no longer exists, or failed, is ended as
   `failed`: nothing would ever launch it.
3. A finished session the backend still holds (its worker died before
   tearing down, or the engine was down then) is reclaimed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from enclave.db import connection
from enclave.models import Session, utcnow
from enclave.sessions import lifecycle
from enclave.sessions.spec import TERMINAL_PHASES, KillReason, Phase, SessionResult
from workers.lease import holder_id, lease_key
from workers.runtime import Runtime, runtime

logger = logging.getLogger(__name__)

LOCK_KEY = "enclave:reaper:lock"
QUEUED_GRACE_S = 60
RECLAIM_GRACE_S = 60
LOST_JOB_STATES = {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


class Reaper:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.missing_since: dict[str, float] = {}

    def run_forever(self) -> None:
        interval = self.rt.settings.reaper_interval_s
        logger.info("reaper up interval_s=%s", interval)
        while True:
            started = time.monotonic()
            try:
                if self._hold_lock(interval):
                    self.run_once()
            except (redis.RedisError, OSError):
                logger.warning("reaper pass failed", exc_info=True)
            except Exception:  # noqa: BLE001 - keep reaping after an unexpected error
                logger.error("reaper pass failed", exc_info=True)
            time.sleep(max(interval - (time.monotonic() - started), 0.1))

    def run_once(self) -> None:
        with connection():
            self.end_lost_sessions()
            self.end_orphaned_queued_sessions()
            self.reclaim_finished_sessions()

    def end_lost_sessions(self) -> None:
        running = Session.select(Session.id).where(
            Session.phase.in_([Phase.PROVISIONING.value, Phase.RUNNING.value])
        )
        now = time.monotonic()
        seen = set()
        for session in running:
            seen.add(session.id)
            if self.rt.redis.exists(lease_key(session.id)):
                self.missing_since.pop(session.id, None)
                continue
            first = self.missing_since.setdefault(session.id, now)
            if now - first < self.rt.settings.lease_ttl_s:
                continue
            self.missing_since.pop(session.id, None)
            if lifecycle.finish_session(
                self.rt.redis,
                session.id,
                SessionResult.killed(KillReason.WORKER_LOST),
                actor="reaper",
            ):
                logger.warning("session lost its worker session_id=%s", session.id)
                self._reclaim(session.id)
        for gone in set(self.missing_since) - seen:
            self.missing_since.pop(gone, None)

    def end_orphaned_queued_sessions(self) -> None:
        cutoff = utcnow() - dt.timedelta(seconds=QUEUED_GRACE_S)
        queued = Session.select(Session.id).where(
            (Session.phase == Phase.QUEUED.value) & (Session.created_at < cutoff)
        )
        for session in queued:
            try:
                status = Job.fetch(session.id, connection=self.rt.redis).get_status()
            except NoSuchJobError:
                status = None
            if status is not None and status not in LOST_JOB_STATES:
                continue
            if lifecycle.finish_session(
                self.rt.redis,
                session.id,
                SessionResult.failed(
                    "The launch job was lost before the session started."
                ),
                actor="reaper",
            ):
                logger.warning("queued session lost its job session_id=%s", session.id)

    def reclaim_finished_sessions(self) -> None:
        cutoff = utcnow() - dt.timedelta(seconds=RECLAIM_GRACE_S)
        leftover = Session.select(Session.id).where(
            Session.phase.in_([p.value for p in TERMINAL_PHASES])
            & Session.torn_down_at.is_null()
            & (Session.finished_at < cutoff)
        )
        for session in leftover:
            self._reclaim(session.id)

    def _reclaim(self, session_id: str) -> None:
        try:
            self.rt.orchestrator.reclaim(session_id, actor="reaper")
        except Exception:  # noqa: BLE001 - try again on the next pass
            logger.warning("reclaim failed session_id=%s", session_id, exc_info=True)

    def _hold_lock(self, interval: float) -> bool:
        """Take or extend the reaper lock; it lapses if this process dies."""
        ttl_ms = int(max(interval * 3, 5) * 1000)
        me = f"reaper:{holder_id()}"
        if self.rt.redis.set(LOCK_KEY, me, nx=True, px=ttl_ms):
            return True
        holder = self.rt.redis.get(LOCK_KEY)
        if holder is not None and holder.decode() == me:
            self.rt.redis.pexpire(LOCK_KEY, ttl_ms)
            return True
        return False


def main() -> None:
    Reaper(runtime()).run_forever()


if __name__ == "__main__":
    main()
