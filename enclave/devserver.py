"""`python -m enclave dev`: the whole service on one machine, for trying it out.

Lifecycle: pick the embedded defaults (SQLite under `var/`, a private
`redis-server` on a free port, a JWT secret generated once and kept in
`var/`), apply migrations, start the web, worker, reaper and egress proxy
processes (and rq-dashboard on 127.0.0.1), run one demo session and print its events, print
a development token and curl lines, then supervise until Ctrl+C, when every
process it started is stopped. Environment variables still win: set
`ENCLAVE_REDIS_URL` to use a Redis that already runs, `ENCLAVE_BACKEND` to
pick a backend, `ENCLAVE_DEV_DIR` to keep its files elsewhere than `var/`.

This is for a laptop or a single box, never production: the secret sits in a
file beside the database.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("ENCLAVE_DEV_DIR", ROOT / "var"))
DEMO_CODE = (
    "import sys, platform\n"
    "print('hello from a sandbox on Python', platform.python_version())\n"
    "print('and a line on stderr', file=sys.stderr)\n"
)


DASHBOARD_PORT = 9181


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DevStack:
    def __init__(self, port: int, workers: int, exit_after_demo: bool) -> None:
        self.port = port
        self.workers = workers
        self.exit_after_demo = exit_after_demo
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.dashboard_port = DASHBOARD_PORT
        self.env = dict(os.environ)

    def run(self) -> int:
        # SIGTERM (a supervisor, `timeout`) must stop the children too, so it
        # unwinds through the same `finally` as Ctrl+C.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        VAR.mkdir(exist_ok=True)
        self._configure()
        try:
            self._start_services()
            self._wait_healthy()
            self._demo()
            if self.exit_after_demo:
                return 0
            self._say("Running. Ctrl+C stops every process started here.")
            return self._supervise()
        except KeyboardInterrupt:
            return 0
        finally:
            self._stop()

    def _configure(self) -> None:
        env = self.env
        env.setdefault("ENCLAVE_ENV", "development")
        env.setdefault("ENCLAVE_DATABASE_URL", f"sqlite:///{VAR / 'enclave.db'}")
        env.setdefault("ENCLAVE_STATE_DIR", str(VAR / "state"))
        env.setdefault("ENCLAVE_BACKEND", default_backend(env))
        env.setdefault("ENCLAVE_JWT_SECRET", self._jwt_secret())
        env["PORT"] = str(self.port)
        env["HOST"] = "127.0.0.1"
        env.setdefault("WEB_CONCURRENCY", "1")
        env.setdefault("ENCLAVE_EGRESS_PROXY_ADDRESS", f"127.0.0.1:{free_port()}")
        if "ENCLAVE_REDIS_URL" not in env:
            env["ENCLAVE_REDIS_URL"] = self._start_redis()

    def _jwt_secret(self) -> str:
        path = VAR / "jwt-secret"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "enclave dev: redis-server is not installed. Install it "
                "(Debian/Ubuntu: sudo apt-get install -y redis-server) or set "
                "ENCLAVE_REDIS_URL to a Redis that runs."
            )
        port = free_port()
        self._spawn(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        return f"redis://127.0.0.1:{port}/0"

    def _start_services(self) -> None:
        python = sys.executable
        subprocess.run(
            [python, "-m", "enclave", "migrate"], env=self.env, cwd=ROOT, check=True
        )
        self._spawn(
            "web", [python, "-m", "gunicorn", "-c", "config/gunicorn.py", "wsgi:app"]
        )
        for index in range(self.workers):
            self._spawn(f"worker-{index}", [python, "-m", "workers.worker"])
        self._spawn("reaper", [python, "-m", "workers.reaper"])
        if importlib.util.find_spec("mitmproxy") is not None:
            self._spawn("egress", [python, "-m", "enclave.egress"])
        else:
            sys.stderr.write(
                "enclave dev: mitmproxy is not installed (pip install -e '.[egress]'); "
                "sessions with an egress allowlist will fail.\n"
            )
        dashboard = shutil.which("rq-dashboard", path=str(Path(python).parent))
        if dashboard:
            # Another program (another `enclave dev`) may hold the usual port.
            if not port_is_free(DASHBOARD_PORT):
                self.dashboard_port = free_port()
            self._spawn(
                "dashboard",
                [
                    dashboard,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.dashboard_port),
                    "--redis-url",
                    self.env["ENCLAVE_REDIS_URL"],
                ],
            )

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(VAR / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if requests.get(self.url("/healthz"), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise SystemExit(
            f"enclave dev: the service did not become healthy; see {VAR}/*.log"
        )

    def _demo(self) -> None:
        token = self._token()
        headers = {"Authorization": f"Bearer {token}"}
        self._say(
            f"Enclave runs at {self.url('')} (backend: {self.env['ENCLAVE_BACKEND']})."
        )
        self._say("Demo session:")
        body = {"language": "python", "code": DEMO_CODE}
        created = requests.post(
            self.url("/sessions"), json=body, headers=headers, timeout=30
        )
        created.raise_for_status()
        session_id = created.json()["id"]
        with requests.get(
            self.url(f"/sessions/{session_id}/stream"),
            headers=headers,
            stream=True,
            timeout=60,
        ) as stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith(("event:", "data:")):
                    self._say("    " + line)
        self._say("")
        self._say("A development token for org_dev (valid 12 hours):")
        self._say(f"    export TOKEN={token}")
        self._say("Run a session and follow it:")
        example = json.dumps({"language": "python", "code": "print(6 * 7)"})
        self._say(
            f'    curl -s {self.url("/sessions")} -H "Authorization: Bearer $TOKEN" '
            f"-H 'Content-Type: application/json' -d '{example}'"
        )
        self._say(
            f'    curl -N {self.url("/sessions/<id>/stream")} -H "Authorization: Bearer $TOKEN"'
        )
        self._say(
            f"API docs: {self.url('/docs')}   "
            f"Queue dashboard: http://127.0.0.1:{self.dashboard_port}"
        )
        self._say(
            f"Logs: {VAR}/*.log   New token: .venv/bin/python -m enclave token org_dev"
        )

    def _token(self) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "enclave", "token", "org_dev"],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def _supervise(self) -> int:
        while True:
            self._check_alive()
            time.sleep(1)

    def _check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise SystemExit(
                    f"enclave dev: {name} exited with {process.returncode}; see {VAR}/{name}.log"
                )

    def _stop(self) -> None:
        for _, process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @staticmethod
    def _say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def default_backend(env: dict[str, str]) -> str:
    """The local sandbox where bubblewrap works here; the simulator otherwise."""
    from enclave.backends.local import LocalBackend
    from enclave.config import Settings

    settings = Settings(
        state_dir=env["ENCLAVE_STATE_DIR"],
        sandbox_rootfs=env.get("ENCLAVE_SANDBOX_ROOTFS") or None,
    )
    health = LocalBackend(settings).health()
    if health.ok:
        return "local"
    sys.stderr.write(
        f"enclave dev: the local sandbox cannot run here ({health.detail}); "
        "using the simulator, which runs no code. Install bubblewrap for real runs.\n"
    )
    return "simulator"


def main(port: int, workers: int, exit_after_demo: bool) -> int:
    return DevStack(port, workers, exit_after_demo).run()
