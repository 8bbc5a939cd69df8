"""The host end of a session's path out: a unix socket forwarded to the proxy.

Lifecycle: the worker's job creates a `Bridge` for each session with egress
before the sandbox starts. `start()` binds and listens on the socket at once
(so that it exists when the sandbox mounts its directory) and runs an asyncio
loop in a thread of its own; each connection accepted there is joined to a
new TCP connection to the proxy, bytes flowing both ways until both sides are
done. `stop()`, called when the job ends, closes the listener and every
connection still open and waits for the thread, so that nothing of the
session can reach the proxy afterwards.

The bridge neither reads nor changes what it forwards: the proxy identifies
the session by the credentials in each request, not by the socket it came in
on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
BACKLOG = 64
STOP_WAIT_S = 5.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until end of stream, then half-close; False when a side failed."""
    try:
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        return False
    return True


async def splice(
    first: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    second: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Join two connections until both directions have ended."""
    pending = {
        asyncio.ensure_future(_pipe(first[0], second[1])),
        asyncio.ensure_future(_pipe(second[0], first[1])),
    }
    try:
        while pending:
            done, pending = await asyncio.wait(
                pending, return_when=asyncio.FIRST_COMPLETED
            )
            # A reset on one side ends the other direction too; a clean end
            # of one direction leaves the other to finish (half-close).
            if not all(task.result() for task in done):
                break
    finally:
        for task in pending:
            task.cancel()
        for _, writer in (first, second):
            writer.close()


class Bridge:
    """Forwards connections on a unix socket to the egress proxy's TCP address."""

    def __init__(self, socket_path: Path, proxy_address: tuple[str, int]) -> None:
        self.socket_path = Path(socket_path)
        self.proxy_address = proxy_address
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._connections: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(self.socket_path))
            listener.listen(BACKLOG)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(
            target=self._serve, name=f"egress-bridge-{self.socket_path.parent.name}"
        )
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait(STOP_WAIT_S)
        if self._server is None:
            self.stop()
            raise OSError(f"the egress bridge on {self.socket_path} did not start")

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_WAIT_S)
        if self._thread.is_alive():
            logger.warning("egress bridge did not stop path=%s", self.socket_path)
        self._thread = None
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            # The thread's last stop: log it; the session sees closed sockets.
            logger.exception("egress bridge failed path=%s", self.socket_path)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_unix_server(
            self._handle, sock=self._listener
        )
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.wait(self._connections, timeout=STOP_WAIT_S)
            await self._server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            try:
                upstream = await asyncio.open_connection(*self.proxy_address)
            except OSError as exc:
                logger.warning(
                    "egress proxy unreachable address=%s:%s error=%s",
                    self.proxy_address[0],
                    self.proxy_address[1],
                    exc,
                )
                writer.close()
                return
            await splice((reader, writer), upstream)
        finally:
            self._connections.discard(task)


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) of the proxy's listener."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)
