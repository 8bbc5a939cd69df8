"""One Redis subscription per web process, fanned out to its SSE clients.

Lifecycle: the first SSE client of a process starts the relay greenlet, which
pattern-subscribes to every session's event channel on one Redis connection
and stays up for the life of the process. Each SSE client registers a
`Watcher` (a bounded queue) for its session *before* it reads the stored
events, so nothing published between the read and the registration is lost;
duplicates are dropped by sequence number downstream.

A process therefore receives every session's events, whatever its clients
watch: one connection and no subscribe round-trip per client, at the cost of
parsing messages nobody here wants, which is cheap next to a SSE client.

When Redis goes away, the relay reconnects with back-off and then tells every
watcher to resynchronise from the database (`RESYNC`), because messages
published meanwhile are gone. A watcher that falls behind (its queue is full)
gets the same treatment instead of unbounded memory.

It runs under gevent (the web processes' worker class); all waiting is
cooperative.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import redis

from enclave.events.log import CHANNEL_PREFIX, Event

logger = logging.getLogger(__name__)

RESYNC = object()
WATCHER_QUEUE_SIZE = 1024
READY_TIMEOUT_S = 5.0


class Watcher:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=WATCHER_QUEUE_SIZE)

    def offer(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except gevent.queue.Full:
            # Too slow to keep up: drop the backlog and let it re-read the log.
            self._drain()
            self.queue.put_nowait(RESYNC)

    def get(self, timeout: float):
        try:
            return self.queue.get(timeout=timeout)
        except gevent.queue.Empty:
            return None

    def _drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except gevent.queue.Empty:
                return


class EventRelay:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.watchers: dict[str, set[Watcher]] = {}
        self.ready = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._start_lock = gevent.lock.Semaphore()

    @contextmanager
    def watch(self, session_id: str) -> Iterator[Watcher]:
        self._ensure_running()
        if not self.ready.wait(READY_TIMEOUT_S):
            raise redis.ConnectionError("the event relay could not subscribe to Redis")
        watcher = Watcher(session_id)
        self.watchers.setdefault(session_id, set()).add(watcher)
        try:
            yield watcher
        finally:
            group = self.watchers.get(session_id)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self.watchers[session_id]

    @property
    def watcher_count(self) -> int:
        return sum(len(group) for group in self.watchers.values())

    def _ensure_running(self) -> None:
        with self._start_lock:
            if self._greenlet is None or self._greenlet.dead:
                self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=False)
            try:
                pubsub.psubscribe(CHANNEL_PREFIX + "*")
                while True:
                    message = pubsub.get_message(timeout=30.0)
                    if message is None:
                        continue
                    if message["type"] == "psubscribe":
                        self._on_subscribed()
                        backoff = 0.1
                    elif message["type"] == "pmessage":
                        self._dispatch(message)
            except (redis.RedisError, OSError):
                self.ready.clear()
                logger.warning("event relay lost Redis; retrying in %.1fs", backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    def _on_subscribed(self) -> None:
        was_ready = self.ready.is_set()
        self.ready.set()
        logger.info("event relay subscribed watchers=%s", self.watcher_count)
        if not was_ready:
            # Anything published while we were away is only in the log now.
            for group in list(self.watchers.values()):
                for watcher in list(group):
                    watcher.offer(RESYNC)

    def _dispatch(self, message) -> None:
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        session_id = channel[len(CHANNEL_PREFIX) :]
        group = self.watchers.get(session_id)
        if not group:
            return
        try:
            event = Event.from_json(message["data"])
        except (ValueError, KeyError):
            logger.warning(
                "event relay dropped a malformed message session_id=%s", session_id
            )
            return
        for watcher in list(group):
            watcher.offer(event)
