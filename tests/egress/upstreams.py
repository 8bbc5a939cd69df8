"""The hosts sessions reach in the egress tests: HTTPS and HTTP on a loopback address.

`TestAuthority` is a throwaway CA (made with `cryptography`) and one server
certificate for every test name. `Upstreams` serves HTTPS on port 443 and
HTTP on port 80 of a loopback address of its own (127.x.y.z, chosen at
random, so that parallel runs and anything else on this machine never share
it), and records every request it answers, headers included, so that tests
can check what reached the host without the sandbox seeing it.

Paths served:
- `/hello`: `hello <host> <scheme>`, naming the Host header and the scheme.
- `/slow`: like `/hello`, after half a second.
- `/simple/demo/`, `/files/<wheel>`: a one-package index pip can download from.
- anything else: 404.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import io
import ipaddress
import os
import random
import ssl
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

WHEEL_NAME = "demo-1.0-py3-none-any.whl"


class TestAuthority:
    """A CA of the test run and a server certificate for the given names."""

    def __init__(self, directory: Path, names: list[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file = self.directory / "server.pem"
        self.cert_file.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + ca_cert.public_bytes(serialization.Encoding.PEM)
        )
        self.key_file = self.directory / "server.key"
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@dataclass
class Seen:
    """One request an upstream answered."""

    scheme: str
    method: str
    path: str
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


def _wheel() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("demo/__init__.py", "VALUE = 42\n")
        archive.writestr(
            "demo-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        )
        archive.writestr(
            "demo-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
        )
        archive.writestr("demo-1.0.dist-info/RECORD", "")
    return buffer.getvalue()


class Upstreams:
    """HTTPS on 443 and HTTP on 80 of one random loopback address."""

    def __init__(self, authority: TestAuthority, address: str | None = None) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(
                "the egress tests serve ports 443 and 80 and must run as root"
            )
        self.address = address or _random_loopback()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.wheel = _wheel()
        self.wheel_sha256 = hashlib.sha256(self.wheel).hexdigest()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(authority.cert_file, authority.key_file)
        self._servers = [
            self._server(443, "https", context),
            self._server(80, "http", None),
        ]
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True)
            for server in self._servers
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def requests(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path is None or s.path == path]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _server(self, port: int, scheme: str, context):
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle's algorithm
            # the second waits for a delayed ACK, 40 ms on every request.
            disable_nagle_algorithm = True

            def do_GET(self):
                upstream._record(
                    Seen(
                        scheme,
                        "GET",
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                    )
                )
                path = self.path.split("?", 1)[0]
                if path in ("/hello", "/slow"):
                    if path == "/slow":
                        time.sleep(0.5)
                    self._send(200, f"hello {self.headers.get('Host')} {scheme}\n")
                elif path == "/simple/demo/":
                    link = f"/files/{WHEEL_NAME}#sha256={upstream.wheel_sha256}"
                    self._send(
                        200,
                        f'<html><body><a href="{link}">{WHEEL_NAME}</a></body></html>',
                        "text/html",
                    )
                elif path == f"/files/{WHEEL_NAME}":
                    self._send(200, upstream.wheel, "application/octet-stream")
                else:
                    self._send(404, "not found\n")

            def _send(self, status, body, content_type="text/plain"):
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        server = http.server.ThreadingHTTPServer((self.address, port), Handler)
        server.daemon_threads = True
        if context is not None:
            # The handshake happens in the request's own thread, so that a
            # client that never speaks cannot stall the accepting one.
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        return server


def _random_loopback() -> str:
    return str(
        ipaddress.IPv4Address(
            f"127.{random.randint(1, 254)}.{random.randint(0, 255)}."
            f"{random.randint(2, 254)}"
        )
    )
