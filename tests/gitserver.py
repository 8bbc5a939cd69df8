"""A git host for the tests: smart HTTP over TLS on 127.0.0.1, private repositories.

Pieces, each usable alone:

* `make_tls_files(directory)`: a throwaway CA and a server certificate it
  signed for 127.0.0.1 and localhost, made with `cryptography`. Clients trust
  the CA file (`GIT_SSL_CAINFO`, `verify=`), as they would a private CA.
* `HTTPSServer(app, tls)`: serves a WSGI app on a free port of 127.0.0.1 from a
  thread, one thread per request.
* `GitHTTPApp(root, authorize)`: git's smart HTTP protocol for the bare
  repositories under `root` (`<owner>/<name>.git`), answered by Debian's
  `git http-backend` run as a CGI program. Every request first goes through
  `authorize(full_name, username, password) -> status`, which decides as
  GitHub does: 200 serve, 401 ask for (other) credentials, 404 not there (or
  not for this token). Only fetching is served; pushes and the dumb protocol
  are refused.
* `create_repository(root, owner, name)`: a bare repository with a known
  history (see `SampleRepository`).
* `ConnectProxy()`: an HTTP CONNECT proxy that records where it was asked to
  go, or refuses every tunnel, for tests of clients that must use a proxy.

Lifecycle: the test starts the servers, uses them, and stops them; `stop()`
releases any request held back by a delay so shutdown never waits on it.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
import re
import select
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from werkzeug.serving import WSGIRequestHandler, make_server

logger = logging.getLogger(__name__)

GIT = shutil.which("git") or "/usr/bin/git"
HTTP_BACKEND = Path("/usr/lib/git-core/git-http-backend")
CGI_TIMEOUT_S = 60

Authorizer = Callable[[str, "str | None", "str | None"], int]


class GitHostError(RuntimeError):
    """The test git host cannot run on this machine; the message says why."""


def require_git() -> None:
    """Fail with a clear message when git or its http-backend is missing."""
    if not Path(GIT).exists() or not HTTP_BACKEND.exists():
        raise GitHostError(
            f"git and {HTTP_BACKEND} are needed for the git host tests: "
            "apt-get install git"
        )


# -- TLS ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    certificate: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.key)
        return context


def make_tls_files(directory: Path) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost, valid a week."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca=directory / "ca.pem",
        certificate=directory / "server.pem",
        key=directory / "server.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# -- the HTTPS server ----------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to DEBUG of this module's logger, not to stderr."""

    def log(self, type: str, message: str, *args) -> None:
        logger.debug("%s " + message, self.address_string(), *args)


class HTTPSServer:
    """A WSGI app on https://127.0.0.1:<free port>, served from a thread."""

    def __init__(self, app, tls: TLSFiles) -> None:
        self.app = app
        self.tls = tls
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def start(self) -> HTTPSServer:
        self._server = make_server(
            "127.0.0.1",
            0,
            self.app,
            threaded=True,
            request_handler=_QuietHandler,
            ssl_context=self.tls.server_context(),
        )
        self._server.daemon_threads = True
        # A short poll interval: `stop()` waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-https",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        stop = getattr(self.app, "stop", None)
        if stop is not None:
            stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None


# -- git's smart HTTP protocol ---------------------------------------------------------

_PATH = re.compile(
    r"^/(?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)(?:\.git)?"
    r"/(?P<rest>info/refs|git-upload-pack|git-receive-pack|HEAD|objects/.+)$"
)


@dataclass
class GitRequest:
    """One request the git host answered, for tests to inspect."""

    repository: str
    username: str | None
    password: str | None
    status: int


class GitHTTPApp:
    """git http-backend behind a token check, like a git host's HTTPS endpoint.

    `allow_sha_wants=False` makes it behave like a host that refuses to serve a
    commit by id: protocol v0 only, no unadvertised objects. `delay_s` holds
    every request back that long (for clients' timeouts).
    """

    def __init__(
        self, root: Path, authorize: Authorizer, *, allow_sha_wants: bool = True
    ) -> None:
        require_git()
        self.root = root
        self.authorize = authorize
        self.allow_sha_wants = allow_sha_wants
        self.delay_s = 0.0
        self.requests: list[GitRequest] = []
        self._released = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._released.set()

    def __call__(self, environ, start_response):
        if self.delay_s:
            self._released.wait(self.delay_s)

        match = _PATH.match(environ.get("PATH_INFO", ""))
        if match is None:
            return _plain(start_response, "404 Not Found", "Not Found\n")
        rest = match["rest"]
        query = environ.get("QUERY_STRING", "")
        if rest == "git-receive-pack" or "service=git-receive-pack" in query:
            return _plain(start_response, "403 Forbidden", "Pushing is not served.\n")
        smart = rest == "git-upload-pack" or (
            rest == "info/refs" and query == "service=git-upload-pack"
        )
        if not smart:
            return _plain(start_response, "403 Forbidden", "Use smart HTTP.\n")

        full_name = f"{match['owner']}/{match['name']}"
        username, password = _basic_credentials(environ)
        status = self.authorize(full_name, username, password)
        with self._lock:
            self.requests.append(GitRequest(full_name, username, password, status))
        if status == 401:
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain"),
                    ("WWW-Authenticate", 'Basic realm="GitHub"'),
                ],
            )
            return [b"Invalid username or password.\n"]
        if status != 200:
            return _plain(start_response, "404 Not Found", "Repository not found.\n")

        repository = self.root / match["owner"] / f"{match['name']}.git"
        if not repository.is_dir():
            return _plain(start_response, "404 Not Found", "Repository not found.\n")
        return self._run_backend(environ, start_response, repository, rest, username)

    def _run_backend(self, environ, start_response, repository, rest, username):
        relative = repository.relative_to(self.root)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "PATH_INFO": f"/{relative}/{rest}",
            "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "REMOTE_ADDR": environ.get("REMOTE_ADDR", "127.0.0.1"),
            "REMOTE_USER": username or "",
        }
        if environ.get("HTTP_CONTENT_ENCODING"):
            env["HTTP_CONTENT_ENCODING"] = environ["HTTP_CONTENT_ENCODING"]
        if self.allow_sha_wants:
            if environ.get("HTTP_GIT_PROTOCOL"):
                env["HTTP_GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        else:
            # Protocol v0 without any of the allow*SHA1InWant settings: a
            # request for a commit that no ref points at is refused.
            env.update(
                {
                    "GIT_CONFIG_COUNT": "2",
                    "GIT_CONFIG_KEY_0": "uploadpack.allowReachableSHA1InWant",
                    "GIT_CONFIG_VALUE_0": "false",
                    "GIT_CONFIG_KEY_1": "uploadpack.allowAnySHA1InWant",
                    "GIT_CONFIG_VALUE_1": "false",
                }
            )

        body = _request_body(environ)
        if body:
            env["CONTENT_LENGTH"] = str(len(body))
        completed = subprocess.run(
            [str(HTTP_BACKEND)],
            input=body,
            env=env,
            capture_output=True,
            timeout=CGI_TIMEOUT_S,
            check=False,
        )
        # CGI headers end at the first empty line, written CRLF or LF alone.
        separator = b"\r\n\r\n" if b"\r\n\r\n" in completed.stdout else b"\n\n"
        head, _, payload = completed.stdout.partition(separator)
        status = "200 OK"
        headers = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name.strip(), value.strip()))
        if completed.returncode != 0 and not head:
            return _plain(
                start_response, "500 Internal Server Error", "backend failed\n"
            )
        start_response(status, headers)
        return [payload]


def _plain(start_response, status: str, text: str):
    start_response(status, [("Content-Type", "text/plain")])
    return [text.encode()]


def _basic_credentials(environ) -> tuple[str | None, str | None]:
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:
        return None, None
    username, _, password = decoded.partition(":")
    return username, password


def _request_body(environ) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return stream.read(int(length))
    if environ.get("wsgi.input_terminated"):
        return stream.read()
    return b""


# -- repositories ----------------------------------------------------------------------


@dataclass
class SampleRepository:
    """A bare repository with a known history.

    Commits (oldest first), each writing its label to `VERSION`:
    `first`; `tagged` (annotated tag `v1.0`); `feature` on branch `feature`
    (made from `tagged`); `main` (the tip of `main`, the default branch).
    `commits` maps each label to its commit id.
    """

    owner: str
    name: str
    path: Path
    commits: dict[str, str] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


def create_repository(root: Path, owner: str, name: str) -> SampleRepository:
    require_git()
    work = root / ".work" / owner / name
    bare = root / owner / f"{name}.git"
    work.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.invalid",
        "GIT_COMMITTER_NAME": "Test Author",
        "GIT_COMMITTER_EMAIL": "author@example.invalid",
    }

    def git(*args: str) -> str:
        completed = subprocess.run(
            [GIT, *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise GitHostError(f"git {args[0]} failed: {completed.stderr.strip()}")
        return completed.stdout.strip()

    sample = SampleRepository(owner=owner, name=name, path=bare)

    def commit(label: str, extra: str | None = None) -> None:
        (work / "VERSION").write_text(label + "\n")
        (work / "README.md").write_text(f"# {owner}/{name}\n\nstate: {label}\n")
        if extra:
            (work / extra).write_text(f"only on {label}\n")
        git("add", "-A")
        git("commit", "-q", "-m", f"state {label}")
        sample.commits[label] = git("rev-parse", "HEAD")

    git("init", "-q", "-b", "main")
    commit("first")
    commit("tagged", extra="app.py")
    git("tag", "-a", "v1.0", "-m", "release 1.0")
    git("checkout", "-q", "-b", "feature")
    commit("feature", extra="feature.txt")
    git("checkout", "-q", "main")
    commit("main")
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", "--bare", str(work), str(bare))
    shutil.rmtree(work)
    return sample


# -- an HTTP CONNECT proxy ---------------------------------------------------------------


class ConnectProxy:
    """A CONNECT-only HTTP proxy on 127.0.0.1 that records the tunnels asked for.

    It records each tunnel's `Proxy-Authorization` too, and checks none.

        `refuse=True` answers every CONNECT with 403, as the egress proxy does for
        a host that is not allowed.
    """

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.tunnels: list[str] = []
        self.authorizations: list[str | None] = []
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ConnectProxy:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._handle(self)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def _handle(self, handler: socketserver.StreamRequestHandler) -> None:
        request_line = handler.rfile.readline(8192).decode("latin-1").strip()
        authorization = None
        while True:
            line = handler.rfile.readline(8192)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "proxy-authorization":
                authorization = value.strip()
        method, _, rest = request_line.partition(" ")
        target = rest.partition(" ")[0]
        if method != "CONNECT":
            handler.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        self.tunnels.append(target)
        self.authorizations.append(authorization)
        if self.refuse:
            handler.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except (OSError, ValueError):
            handler.wfile.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
            )
            return
        handler.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        handler.wfile.flush()
        _pump(handler.connection, upstream)


def _pump(client: socket.socket, upstream: socket.socket) -> None:
    sockets = [client, upstream]
    try:
        while True:
            readable, _, _ = select.select(sockets, [], [], 30)
            if not readable:
                return
            for source in readable:
                data = source.recv(65536)
                if not data:
                    return
                (upstream if source is client else client).sendall(data)
    except OSError:
        return
    finally:
        upstream.close()
