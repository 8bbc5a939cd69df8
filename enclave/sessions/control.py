"""Stop requests from the API to the worker that runs a session.

A DELETE may land on any web process while the session runs in some worker.
The request is a Redis key (so a worker that checks late still sees it) and a
pub/sub message (so a waiting worker reacts at once).
"""

from __future__ import annotations

import logging

import redis

logger = logging.getLogger(__name__)

STOP_KEY = "enclave:stop:"
CONTROL_CHANNEL = "enclave:control:"
STOP_TTL_S = 24 * 3600


def request_stop(client: redis.Redis, session_id: str) -> None:
    try:
        client.set(STOP_KEY + session_id, "teardown", ex=STOP_TTL_S)
        client.publish(CONTROL_CHANNEL + session_id, "stop")
    except redis.RedisError:
        # The session is already recorded as killed; the reaper reclaims it.
        logger.warning(
            "stop request not delivered session_id=%s", session_id, exc_info=True
        )


def stop_requested(client: redis.Redis, session_id: str) -> bool:
    return bool(client.exists(STOP_KEY + session_id))


def control_channel(session_id: str) -> str:
    return CONTROL_CHANNEL + session_id
