"""A TCP forwarder between the backend and the API server, to pull the plug on.

The backend under test talks to `Plug.address` instead of the API server.
`drop()` closes every open connection at once (a restart of the API server, a
load balancer losing its state); `blackhole()` stops moving bytes in both
directions and holds new connections open without answering (a server gone
silent, the worst case for a client without timeouts); `restore()` goes back
to forwarding. TLS passes through untouched.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

POLL_S = 0.1


class Plug:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="plug", daemon=True)
        self._thread.start()

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def drop(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _close(*pair)

    def blackhole(self) -> None:
        self._forwarding.clear()

    def restore(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self._listener.close()
        self.drop()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._serve, args=(client,), name="plug-pair", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        # A new connection in the blackhole is held, never answered.
        while not self._forwarding.wait(POLL_S):
            if self._closed:
                client.close()
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._pairs.append((client, upstream))
        self._pump(client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        selector = selectors.DefaultSelector()
        for sock in peers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        try:
            while True:
                if not self._forwarding.is_set():
                    # Bytes stay where they are; both ends wait in silence.
                    self._forwarding.wait(POLL_S)
                    if self._closed:
                        return
                    continue
                for key, _ in selector.select(POLL_S):
                    try:
                        data = key.fileobj.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not data:
                        return
                    peer = peers[key.fileobj]
                    peer.setblocking(True)
                    peer.sendall(data)
                    peer.setblocking(False)
        except (OSError, ValueError):
            # One side was closed, by its peer or by drop().
            return
        finally:
            selector.close()
            _close(client, upstream)
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
