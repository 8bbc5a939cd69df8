"""What a worker-side process builds once at start-up and every job reuses."""

from __future__ import annotations

import functools

import redis

from enclave.backends import SessionBackend, create_backend
from enclave.config import Settings
from enclave.connections import redis_client, session_queue
from enclave.db import configure_database
from enclave.logs import configure_logging
from enclave.sessions.orchestrator import Orchestrator


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_database(settings.database_url, max_connections=8)
        self.redis: redis.Redis = redis_client(settings)
        self.backend: SessionBackend = create_backend(settings)
        self.orchestrator = Orchestrator(
            settings, self.redis, session_queue(settings, self.redis), self.backend
        )


@functools.cache
def runtime() -> Runtime:
    settings = Settings.load()
    configure_logging(settings)
    return Runtime(settings)
