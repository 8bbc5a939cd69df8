#!/usr/bin/python3
"""The first process of a session's Kubernetes container: runs the code, frames output.

The Kubernetes logs API returns a container's stdout and stderr merged into one
stream, so a session's two streams cannot be told apart there. This launcher
runs the interpreter with a pipe for each and copies both to its own stdout as
frames, one line each, which the backend (`enclave.backends.kubernetes`) splits
again with `decode_frame`:

    o <seq> <base64>     bytes the code wrote to stdout
    e <seq> <base64>     bytes the code wrote to stderr
    h                    a heartbeat, after `HEARTBEAT_S` without a frame

`seq` counts the o/e frames from 1. The logs API can only replay a container's
log from its beginning, so a reader whose connection dropped reads it again and
skips every frame it already delivered; the heartbeat lets it use a read
timeout on a quiet session without mistaking silence for a dead connection.
Base64 keeps every frame one line of ASCII, which the container runtime's log
files and the API carry unchanged.

Lifecycle, as PID 1 of the container:

1. Copy the code from the input directory (a read-only ConfigMap volume) to
   `main.py` or `main.js` in the working directory, as the other backends do.
2. Start the interpreter in a session of its own: stdin from the input
   directory's `stdin` file (or /dev/null), RLIMIT_CPU of `--cpu-s` (SIGXCPU at
   the soft limit tells a CPU-time kill apart), no core dumps.
3. Copy output as frames while it runs. SIGTERM, SIGINT and SIGHUP (the kubelet
   stopping the pod) are passed on to the interpreter's process group; orphans
   that land on PID 1 are reaped.
4. When the interpreter ends, kill what is left of its process group, drain the
   pipes, write `{"exit_code": ..., "signal": ...}` to the termination log (the
   kubelet copies it into the container's terminated state) and exit with the
   interpreter's code, or 128 + n when signal n ended it.

Standard library only: it runs on the sandbox image's Python, and the backend
imports `decode_frame` from it on the host.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

STDOUT = "o"
STDERR = "e"
HEARTBEAT = "h"

HEARTBEAT_S = 5.0
# 8 KiB of output is an 11 KiB line: under the 16 KiB at which container
# runtimes split long log lines (they join them again, but less is less).
CHUNK_BYTES = 8 * 1024
# After the interpreter ends: how long its pipes may stay open (a process of
# its own session can hold them) before the launcher stops reading.
DRAIN_S = 2.0
POLL_S = 0.5

INTERPRETERS = {
    "python": ("/usr/bin/python3", "main.py"),
    "node": ("/usr/bin/node", "main.js"),
}
CODE_FILE = "code"
STDIN_FILE = "stdin"
TERMINATION_LOG = "/dev/termination-log"


class Frame(NamedTuple):
    kind: str
    seq: int
    data: bytes


def encode_frame(kind: str, seq: int = 0, data: bytes = b"") -> bytes:
    if kind == HEARTBEAT:
        return b"h\n"
    return b"%s %d %s\n" % (kind.encode(), seq, base64.b64encode(data))


def decode_frame(line: bytes) -> Frame | None:
    """The frame one log line holds (without its newline), or None if it is none."""
    if line == b"h":
        return Frame(HEARTBEAT, 0, b"")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"o", b"e") or not parts[1].isdigit():
        return None
    try:
        data = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    return Frame(parts[0].decode(), int(parts[1]), data)


class _Output:
    """Writes frames to fd 1, numbering them and noting when the last one went."""

    def __init__(self) -> None:
        self.seq = 0
        self.last_write = time.monotonic()

    def frame(self, kind: str, data: bytes = b"") -> None:
        if kind != HEARTBEAT:
            self.seq += 1
        self._write(encode_frame(kind, self.seq, data))

    def _write(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            try:
                written = os.write(1, view)
            except InterruptedError:
                continue
            except OSError:
                # Nobody reads the log any more; the workload still runs to
                # its end and its exit status still matters.
                return
            view = view[written:]
        self.last_write = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = _Output()
    try:
        process = _start(args)
    except (OSError, ValueError) as exc:
        out.frame(STDERR, f"enclave: the session could not start: {exc}\n".encode())
        _write_termination_log(args.termination_log, 1, None)
        return 1

    _forward_signals(process.pid)
    status = _copy_output(process, out)
    exit_code, number = _decode_status(status)
    _write_termination_log(args.termination_log, exit_code, number)
    return exit_code


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launcher")
    parser.add_argument("--language", required=True, choices=sorted(INTERPRETERS))
    parser.add_argument("--input", required=True, help="directory of code and stdin")
    parser.add_argument("--cpu-s", type=int, required=True)
    parser.add_argument("--termination-log", default=TERMINATION_LOG)
    return parser.parse_args(argv)


def _start(args: argparse.Namespace) -> subprocess.Popen:
    interpreter, name = INTERPRETERS[args.language]
    target = os.path.join(os.getcwd(), name)
    with open(os.path.join(args.input, CODE_FILE), "rb") as source:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as copy:
            shutil.copyfileobj(source, copy)

    stdin_path = os.path.join(args.input, STDIN_FILE)
    if not os.path.exists(stdin_path):
        stdin_path = os.devnull
    cpu_s = max(1, args.cpu_s)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with open(stdin_path, "rb") as stdin:
        return subprocess.Popen(
            [interpreter, target],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # The launcher has no threads, so running code between fork and
            # exec is safe; the limits must not apply to the launcher itself.
            preexec_fn=limit,  # noqa: PLW1509
        )


def _forward_signals(pgid: int) -> None:
    def forward(signum, _frame) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)


def _copy_output(process: subprocess.Popen, out: _Output) -> int:
    """Frame output until the interpreter ended and its pipes are drained; its status."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, STDOUT)
    selector.register(process.stderr, selectors.EVENT_READ, STDERR)
    status: int | None = None
    drain_until: float | None = None

    while selector.get_map():
        for key, _ in selector.select(timeout=POLL_S):
            try:
                data = os.read(key.fd, CHUNK_BYTES)
            except InterruptedError:
                continue
            if data:
                out.frame(key.data, data)
            else:
                selector.unregister(key.fileobj)
                key.fileobj.close()

        if status is None:
            status = _reap(process.pid)
            if status is not None:
                # The session is over when its program is; anything it left
                # running in the background goes with it.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                drain_until = time.monotonic() + DRAIN_S
        else:
            _reap(process.pid)
        if drain_until is not None and time.monotonic() > drain_until:
            break
        if time.monotonic() - out.last_write >= HEARTBEAT_S:
            out.frame(HEARTBEAT)

    for key in list(selector.get_map().values()):
        key.fileobj.close()
    while status is None:
        status = _reap(process.pid, block=True)
    return status


def _reap(child: int, block: bool = False) -> int | None:
    """Reap every exited process (PID 1 inherits orphans); the child's wait status."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return found
        except InterruptedError:
            continue
        if pid == 0:
            return found
        if pid == child:
            found = status
            if block:
                return found


def _decode_status(status: int) -> tuple[int, int | None]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return 128 + number, number
    return os.waitstatus_to_exitcode(status), None


def _write_termination_log(path: str, exit_code: int, number: int | None) -> None:
    try:
        with open(path, "w", encoding="utf-8") as log:
            json.dump({"exit_code": exit_code, "signal": number}, log)
    except OSError:
        # Outside a pod (or with the log not mounted) the exit status still
        # tells what happened, only less precisely.
        pass


if __name__ == "__main__":
    sys.exit(main())
