"""The host end of a session's path out (`enclave.egress.bridge`), with real sockets."""

from __future__ import annotations

import socket
import socketserver
import threading

import pytest

from enclave.egress.bridge import Bridge, parse_address


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        received = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            received += chunk
        # Only after the client's half-close: proves it reached the far side.
        self.request.sendall(b"echo:" + received)


class _Hold(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello")
        self.request.recv(1)


@pytest.fixture
def server(request):
    handler = getattr(request, "param", _Echo)
    tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    tcp.daemon_threads = True
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    yield tcp
    tcp.shutdown()
    tcp.server_close()


def unix_connect(path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(str(path))
    return client


def test_bridge_forwards_both_ways_with_half_close(tmp_path, server):
    bridge = Bridge(tmp_path / "proxy.sock", server.server_address)
    bridge.start()
    try:
        client = unix_connect(tmp_path / "proxy.sock")
        payload = b"x" * 300_000
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        client.close()
    finally:
        bridge.stop()

    assert answer == b"echo:" + payload


@pytest.mark.parametrize("server", [_Hold], indirect=True)
def test_bridge_stop_cuts_open_connections_and_removes_the_socket(tmp_path, server):
    path = tmp_path / "proxy.sock"
    bridge = Bridge(path, server.server_address)
    bridge.start()
    client = unix_connect(path)
    assert client.recv(5) == b"hello"

    bridge.stop()

    assert client.recv(10) == b""
    assert not path.exists()
    with pytest.raises(OSError):
        unix_connect(path)
    client.close()


def test_bridge_closes_a_connection_when_the_proxy_is_down(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused = probe.getsockname()
    bridge = Bridge(tmp_path / "proxy.sock", unused)
    bridge.start()
    try:
        client = unix_connect(tmp_path / "proxy.sock")
        assert client.recv(10) == b""
        client.close()
    finally:
        bridge.stop()


def test_bridge_parses_proxy_addresses():
    assert parse_address("127.0.0.1:8180") == ("127.0.0.1", 8180)
    assert parse_address("[::1]:3129") == ("::1", 3129)
    for bad in ("127.0.0.1", ":80", "host:port"):
        with pytest.raises(ValueError):
            parse_address(bad)
