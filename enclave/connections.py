"""Clients for the services every process shares: Redis and the RQ queue."""

from __future__ import annotations

import redis
from rq import Queue

from enclave.config import Settings


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client with bounded timeouts, so a dead Redis fails fast, not hangs."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
    )


def session_queue(settings: Settings, connection: redis.Redis) -> Queue:
    return Queue(settings.queue_name, connection=connection)
