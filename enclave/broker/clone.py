"""The host's side of the clone step: its token file, command line and verdict.

A backend runs `enclave/sandbox/clone_step.py` apart from the workload, with
the checkout directory and (for a private repository) one token file mounted
into it and into nothing else. This module holds what every backend needs to
do that the same way:

* `write_token_file(directory, credential)`: the token in a file of its own,
  readable by the clone step's user alone; `remove_token_file` once the step
  has exited (the token is revoked then too);
* `CloneStep(...).argv()`: the command line, which names the token file but
  never holds the token;
* `describe_clone_failure(exit_code, ...)`: the session's `error` for a failed
  clone, worded from the exit code alone so that nothing the git host said is
  ever passed on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from enclave.broker.provider import GitCredential
from enclave.sandbox import clone_step

# Where the programs and the token appear inside the clone step's sandbox.
SANDBOX_PYTHON = "/usr/bin/python3"
PROGRAM_DIR = "/opt/enclave/sandbox"
TOKEN_DIR = "/run/enclave-git"
TOKEN_FILE_NAME = "token"


@dataclass(frozen=True)
class CloneStep:
    """The clone step of one session, as seen from inside its sandbox."""

    url: str
    ref: str | None
    dest: str
    timeout_s: float
    token_file: str | None = None
    username: str = "x-access-token"
    ca_bundle: str | None = None
    program_dir: str = PROGRAM_DIR
    python: str = SANDBOX_PYTHON

    def argv(self) -> list[str]:
        args = [
            self.python,
            f"{self.program_dir}/clone_step.py",
            "--url",
            self.url,
            "--dest",
            self.dest,
            "--timeout-s",
            f"{self.timeout_s:g}",
            "--askpass",
            f"{self.program_dir}/git_askpass.py",
        ]
        if self.ref is not None:
            args += ["--ref", self.ref]
        if self.token_file is not None:
            args += ["--token-file", self.token_file, "--username", self.username]
        if self.ca_bundle is not None:
            args += ["--ca-bundle", self.ca_bundle]
        return args


def write_token_file(
    directory: Path,
    credential: GitCredential,
    *,
    uid: int | None = None,
    gid: int | None = None,
) -> Path:
    """Write the token to `directory/token`, mode 0400, owned by `uid`:`gid`.

    `directory` is made private (0700) first; it is the one thing a backend
    mounts into the clone step for the token, and nothing else may see it.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / TOKEN_FILE_NAME
    # O_EXCL: a file already there (a stale or planted one) is an error, not
    # something to write a token into.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, credential.token.encode())
    finally:
        os.close(fd)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        os.chown(directory, -1 if uid is None else uid, -1 if gid is None else gid)
    return path


def remove_token_file(path: Path) -> None:
    """Delete the token file and its directory; missing ones are fine."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def describe_clone_failure(
    exit_code: int, *, url: str, ref: str | None, timeout_s: float, with_token: bool
) -> str:
    """The session's `error` for a clone step that exited with `exit_code`."""
    if exit_code == clone_step.EXIT_NOT_FOUND and not with_token:
        template = clone_step.ANONYMOUS_NOT_FOUND
    else:
        template = clone_step.MESSAGES.get(
            exit_code, "the clone step failed (exit code {exit_code}) for {url}"
        )
    return "clone failed: " + template.format(
        url=url, ref=ref or "HEAD", timeout_s=f"{timeout_s:g}", exit_code=exit_code
    )
