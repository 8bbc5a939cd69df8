"""A worker's lease on the session it runs, and its ear for stop requests.

While a job runs a session, a background thread renews a Redis key with a
short TTL (`lease_ttl_s`) every `heartbeat_s`. The reaper treats a running
session without a lease as lost. The same thread listens on the session's
control channel and calls `on_stop` when the API asks for the session to be
stopped; it also checks the stop key once subscribed, so a request made
before the subscription is not missed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

import redis

from enclave.sessions import control

logger = logging.getLogger(__name__)

LEASE_KEY = "enclave:lease:"


def lease_key(session_id: str) -> str:
    return LEASE_KEY + session_id


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class SessionLease:
    def __init__(
        self,
        client: redis.Redis,
        session_id: str,
        *,
        ttl_s: int,
        heartbeat_s: float,
        on_stop: Callable[[], None],
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.on_stop = on_stop
        self._done = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{session_id}", daemon=True
        )

    def __enter__(self) -> "SessionLease":
        self._renew()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        try:
            # Wake the listener now rather than at its next heartbeat.
            self.client.publish(control.control_channel(self.session_id), "release")
        except redis.RedisError:
            pass
        self._thread.join(timeout=self.heartbeat_s + 5)
        try:
            self.client.delete(lease_key(self.session_id))
        except redis.RedisError:
            logger.warning("lease release failed session_id=%s", self.session_id)

    def _renew(self) -> None:
        self.client.set(lease_key(self.session_id), holder_id(), ex=self.ttl_s)

    def _run(self) -> None:
        pubsub = None
        while not self._done.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(control.control_channel(self.session_id))
                    if control.stop_requested(self.client, self.session_id):
                        self._stop()
                self._renew()
                message = pubsub.get_message(timeout=self.heartbeat_s)
                if message is not None and message.get("data") == b"stop":
                    self._stop()
            except redis.RedisError:
                # Keep trying: the lease only lapses if Redis stays away past its TTL.
                logger.warning("lease heartbeat failed session_id=%s", self.session_id)
                pubsub = None
                self._done.wait(self.heartbeat_s)
        if pubsub is not None:
            pubsub.close()

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        logger.info("stop requested session_id=%s", self.session_id)
        try:
            self.on_stop()
        except Exception:  # noqa: BLE001 - a failed teardown must not kill the heartbeat
            logger.error(
                "teardown on stop failed session_id=%s", self.session_id, exc_info=True
            )
