"""The README's first command: the whole service on one machine, with a demo run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_dev_command_starts_the_service_and_runs_a_demo_session(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ENCLAVE_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env["ENCLAVE_DEV_DIR"] = str(tmp_path)

    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "enclave",
            "dev",
            "--port",
            str(free_port()),
            "--exit-after-demo",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    out = finished.stdout
    assert "event: result" in out
    assert '"phase": "succeeded"' in out
    assert "export TOKEN=" in out
    assert "curl -s http://127.0.0.1:" in out
    assert (tmp_path / "enclave.db").exists()
    assert oct((tmp_path / "jwt-secret").stat().st_mode & 0o777) == "0o600"
    secret = (tmp_path / "jwt-secret").read_text().strip()
    assert secret not in out + finished.stderr
    for log in tmp_path.glob("*.log"):
        assert secret not in log.read_text(errors="replace")


def test_dev_command_stops_everything_it_started_on_sigterm(tmp_path):
    import signal
    import time

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ENCLAVE_") and key not in ("DATABASE_URL", "REDIS_URL")
    }
    env["ENCLAVE_DEV_DIR"] = str(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "enclave", "dev", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("Running."):
                break
        children = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 5  # redis, web, workers, reaper, egress

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

        deadline = time.monotonic() + 20
        alive = children
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
            time.sleep(0.2)
        assert alive == []
    finally:
        if process.poll() is None:
            process.kill()
