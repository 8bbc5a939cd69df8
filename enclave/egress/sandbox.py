"""A session's path out of its sandbox: the directory, the relay, the environment.

Lifecycle of one session with a non-empty `egress.allow`:

1. The worker's job opens a `SessionEgress` before it calls the backend. That
   draws a random proxy token, makes the session's directory
   `<egress_sessions_dir>/<session_id>` and fills it: `proxy.sock` (served by
   a `Bridge` to the proxy), `relay.py` and `node-proxy.js` (from
   `enclave/sandbox/`), `ca-bundle.pem` (the public roots plus the proxy's
   CA, never its key) and `environment.json` (the proxy and CA variables the
   code runs with). Last, it writes the session's policy to Redis with the
   token's hash.
2. The backend finds the directory (`prepared_directory`), hands it to the
   uid the sandbox runs as (`hand_over`), mounts it read-only at
   `/run/enclave` and starts the code through the relay (`relay_command`):
   the relay listens on the sandbox's 127.0.0.1:3128, forwards every
   connection to `proxy.sock`, puts `environment.json` into the environment
   and execs the interpreter.
3. When the job ends, `SessionEgress.close()` deletes the policy (the token
   is refused from then on), stops the bridge (open connections are cut) and
   removes the directory. A backend's `teardown` also removes a directory a
   dead job left behind (`remove_session_directory`); the policy's TTL ends
   its Redis key.

The token appears in `environment.json` and in the sandbox's proxy
variables, nowhere else: not in a command line, a log line or Redis.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Self

import redis

from enclave.egress import policy as policies
from enclave.egress.authority import sandbox_bundle_path
from enclave.egress.bridge import Bridge, parse_address
from enclave.sessions.spec import LaunchSpec

logger = logging.getLogger(__name__)

# Where the directory appears inside every sandbox, and what it holds.
MOUNT_POINT = "/run/enclave"
SOCKET_FILE = "proxy.sock"
RELAY_FILE = "relay.py"
NODE_PRELOAD_FILE = "node-proxy.js"
CA_BUNDLE_FILE = "ca-bundle.pem"
ENVIRONMENT_FILE = "environment.json"
RELAY_PORT = 3128

SANDBOX_SOURCES = Path(__file__).resolve().parent.parent / "sandbox"

# Every TLS stack a sandbox is likely to use, pointed at the bundle.
CA_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
)
# Connections to the sandbox's own loopback never go through the proxy.
NO_PROXY = "localhost,127.0.0.1,::1"


class EgressUnavailable(Exception):
    """The session's path out could not be prepared; the message is safe to show."""


def sessions_directory(settings) -> Path:
    """Where the sessions' egress directories live.

    Not inside the state directory, which the local backend keeps to the
    worker alone: bwrap, running as a session's own uid, must be able to
    reach the session's directory, so every directory above it needs o+x.
    """
    if settings.egress_sessions_dir:
        return Path(settings.egress_sessions_dir)
    state = Path(settings.state_dir)
    return state.with_name(state.name + "-egress")


def session_directory(settings, session_id: str) -> Path:
    if not session_id or "/" in session_id or session_id.startswith("."):
        raise ValueError("not a session id")
    return sessions_directory(settings) / session_id


def sandbox_environment(session_id: str, token: str) -> dict[str, str]:
    """The variables the code runs with when the session has egress."""
    proxy = f"http://{session_id}:{token}@127.0.0.1:{RELAY_PORT}"
    bundle = f"{MOUNT_POINT}/{CA_BUNDLE_FILE}"
    environment = {
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": NO_PROXY,
        "no_proxy": NO_PROXY,
        "NODE_OPTIONS": f"--require {MOUNT_POINT}/{NODE_PRELOAD_FILE}",
    }
    environment.update({name: bundle for name in CA_VARIABLES})
    return environment


class SessionEgress:
    """What the worker holds for one session's egress while it runs."""

    def __init__(
        self,
        settings,
        client: redis.Redis,
        spec: LaunchSpec,
        report_to: str | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.spec = spec
        self.report_to = report_to
        self.directory = session_directory(settings, spec.session_id)
        self.bridge: Bridge | None = None
        self._policy_written = False

    @classmethod
    def open(
        cls,
        settings,
        client: redis.Redis,
        spec: LaunchSpec,
        report_to: str | None = None,
    ) -> Self:
        egress = cls(settings, client, spec, report_to)
        try:
            egress._prepare()
        except BaseException:
            egress.close()
            raise
        return egress

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Refuse the token, cut the bridge, remove the directory; idempotent."""
        if self._policy_written:
            try:
                policies.remove_policy(self.client, self.spec.session_id)
                self._policy_written = False
            except redis.RedisError:
                # The TTL removes it a little later; the bridge going away
                # below already leaves the sandbox no way to use it.
                logger.warning(
                    "egress policy not removed session_id=%s",
                    self.spec.session_id,
                    exc_info=True,
                )
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _prepare(self) -> None:
        spec = self.spec
        bundle = sandbox_bundle_path(self.settings)
        if not bundle.is_file():
            raise EgressUnavailable(
                "egress is not available: the egress proxy has not started yet"
            )
        try:
            address = parse_address(self.settings.egress_proxy_address)
        except ValueError as exc:
            raise EgressUnavailable(
                "egress is not available: the proxy address is misconfigured"
            ) from exc

        token = policies.new_token()
        parent = sessions_directory(self.settings)
        parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        # Left over by a job that died: nothing in it can still be in use.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(mode=0o700)
        shutil.copyfile(bundle, self.directory / CA_BUNDLE_FILE)
        shutil.copyfile(SANDBOX_SOURCES / RELAY_FILE, self.directory / RELAY_FILE)
        shutil.copyfile(
            SANDBOX_SOURCES / NODE_PRELOAD_FILE, self.directory / NODE_PRELOAD_FILE
        )
        _write_private(
            self.directory / ENVIRONMENT_FILE,
            json.dumps(sandbox_environment(spec.session_id, token)),
        )

        self.bridge = Bridge(self.directory / SOCKET_FILE, address)
        self.bridge.start()

        policies.store_policy(
            self.client,
            policies.Policy(
                session_id=spec.session_id,
                org_id=spec.org_id,
                allow=tuple(spec.egress.allow),
                bindings=tuple(spec.service_bindings),
                token_sha256=policies.token_digest(token),
                report_to=self.report_to,
            ),
            ttl_s=spec.limits.timeout_s,
        )
        self._policy_written = True
        logger.info(
            "egress prepared session_id=%s org_id=%s hosts=%s bindings=%s",
            spec.session_id,
            spec.org_id,
            len(spec.egress.allow),
            len(spec.service_bindings),
        )


# -- for the backends -----------------------------------------------------------


def prepared_directory(settings, session_id: str) -> Path | None:
    """The session's egress directory, when the worker has prepared one."""
    directory = session_directory(settings, session_id)
    if (directory / SOCKET_FILE).exists() and (directory / ENVIRONMENT_FILE).exists():
        return directory
    return None


def hand_over(directory: Path, uid: int) -> None:
    """Let the sandbox's uid (and no other) use the directory.

    Connecting to a unix socket needs write permission on it, and reading the
    environment file holds the session's token, so both belong to the uid the
    sandbox runs as. A worker that is not root cannot give files away; when
    the sandbox runs as another uid than the worker's, the directory is then
    opened to every local user instead, the token being only as good as the
    session's own short life.
    """
    # TODO: docker without user-namespace remapping runs the sandbox as host
    # uid 1000, so a host account with that uid can read the token too.
    entries = [directory, *directory.iterdir()]
    if os.geteuid() == 0:
        for path in entries:
            os.lchown(path, uid, uid)
        return
    if uid == os.geteuid():
        return
    logger.warning(
        "egress directory opened to all local users: the worker is not root "
        "and the sandbox runs as uid %s",
        uid,
    )
    for path in entries:
        if path.is_dir():
            os.chmod(path, 0o755)
        elif path.is_socket():
            os.chmod(path, 0o666)
        else:
            os.chmod(path, 0o644)


def reachable_by_all(directory: Path) -> bool:
    """Whether every directory above `directory` lets any uid pass through."""
    for parent in directory.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return True


def relay_command(python: str) -> list[str]:
    """What goes in front of the interpreter's command to start the relay first."""
    return [
        python,
        "-I",
        "-S",
        f"{MOUNT_POINT}/{RELAY_FILE}",
        f"{MOUNT_POINT}/{SOCKET_FILE}",
        f"{MOUNT_POINT}/{ENVIRONMENT_FILE}",
        str(RELAY_PORT),
        "--",
    ]


def remove_session_directory(settings, session_id: str) -> None:
    """Remove what a session's job left behind, if anything; idempotent."""
    # TODO: the policy of a session whose job died stays in Redis until its
    # TTL (the timeout plus five minutes). The sandbox and the bridge died
    # with the job, so no sandbox can use it, but its token still opens the
    # proxy's port to a local user who read it; deleting the policy when the
    # reaper reclaims the session would close that window.
    with contextlib.suppress(ValueError):
        shutil.rmtree(session_directory(settings, session_id), ignore_errors=True)


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as target:
        target.write(content)
