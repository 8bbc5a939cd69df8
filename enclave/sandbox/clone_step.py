"""The clone step: check a git repository out before a session's code runs.

It runs apart from the workload (a separate process on `local`, an init
container on `docker` and `kubernetes`) and shares only the checkout directory
with it. Standard library only: it runs on the sandbox image's Python.

    python3 clone_step.py --url https://github.com/acme/app.git --ref main \\
        --dest /workspace --timeout-s 30 [--token-file /run/enclave-git/token] \\
        [--ca-bundle /etc/enclave/git-ca.pem]

Lifecycle: validate the arguments; `git init` the (empty) destination; add
`origin`; shallow-fetch the ref (`git fetch --depth 1 origin <ref>`: a branch,
a tag, a full commit id, or the default branch when no ref is given); check
out `FETCH_HEAD` detached. A host that refuses to serve a commit by its id, and
a short commit id, get a full fetch of branches and tags instead, after which
the commit is looked up locally. On success it prints one JSON line,
`{"commit": "<sha>"}`, and exits 0.

The token: when `--token-file` is given, git gets it from `git_askpass.py`
beside this file, which reads the file when git asks for a password for the
repository's host and for no other. The token is therefore never in a URL, an
argument or an environment variable, and since no credential helper is
configured (system and global git configuration are ignored) git stores it
nowhere: `.git/config` holds only the plain `origin` URL.

Failures: every failure exits with one of the codes below and one line on
stderr, made by this program from the kind of failure. git's own output is
never passed on: it may quote what a remote said, and nothing a server sends
reaches the session's `error`. The codes, not the line, are the contract; the
host side (`enclave.broker.clone`) words the session's error from them.

Network: git goes through the proxy in `HTTPS_PROXY`/`https_proxy` (and the
other usual proxy variables) when they are set, and trusts the CA bundle in
`--ca-bundle`, `GIT_SSL_CAINFO` or `SSL_CERT_FILE` (the first one set) instead
of the system's.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 20
EXIT_AUTH_DENIED = 21
EXIT_BAD_REF = 22
EXIT_TIMEOUT = 23
EXIT_NETWORK = 24
EXIT_NO_SPACE = 25
EXIT_GIT_FAILED = 26

# One line per failure, with `{url}`, `{ref}` and `{timeout_s}` filled in. The
# host side uses the same table, so the session's error reads the same whether
# it comes from here or from the exit code alone.
MESSAGES = {
    EXIT_USAGE: "the clone step was started with invalid arguments",
    EXIT_NOT_FOUND: "repository not found: {url}",
    EXIT_AUTH_DENIED: "the git host refused the credential for {url}",
    EXIT_BAD_REF: "ref {ref} is not a branch, tag or commit of {url}",
    EXIT_TIMEOUT: "cloning {url} did not finish within {timeout_s}s",
    EXIT_NETWORK: "the git host of {url} could not be reached",
    EXIT_NO_SPACE: "the checkout of {url} does not fit in the session's disk space",
    EXIT_GIT_FAILED: "git failed while cloning {url}",
}
ANONYMOUS_NOT_FOUND = (
    "repository not found, or private and no credential was issued for it: {url}"
)

ASKPASS = Path(__file__).resolve().with_name("git_askpass.py")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)
# Every git command runs with these: only https, no redirects (a token must not
# follow one to another host), no credential helper from anywhere, no hooks.
GIT_OPTIONS = (
    "-c",
    "protocol.allow=never",
    "-c",
    "protocol.https.allow=always",
    "-c",
    "http.followRedirects=false",
    # Proxy credentials (the egress proxy's per-session ones) go with the
    # first CONNECT: git would otherwise wait for a 407 challenge first.
    "-c",
    "http.proxyAuthMethod=basic",
    "-c",
    "credential.helper=",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "fetch.recurseSubmodules=false",
    "-c",
    "submodule.recurse=false",
    "-c",
    "advice.detachedHead=false",
    "-c",
    "init.defaultBranch=main",
)

_SHA = re.compile(r"^[0-9a-fA-F]{7,40}$")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_OWNER_OR_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}$")

_current: subprocess.Popen | None = None


class CloneFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise CloneFailed(EXIT_TIMEOUT)
        return left


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    args = _parse_args(argv)
    context = {
        "url": args.url,
        "ref": args.ref or "HEAD",
        "timeout_s": f"{args.timeout_s:g}",
    }
    try:
        commit = clone(args)
    except CloneFailed as failure:
        message = MESSAGES[failure.code]
        if failure.code == EXIT_NOT_FOUND and not args.token_file:
            message = ANONYMOUS_NOT_FOUND
        sys.stderr.write("clone failed: " + message.format(**context) + "\n")
        return failure.code
    sys.stdout.write(json.dumps({"commit": commit}) + "\n")
    return EXIT_OK


def clone(args: argparse.Namespace) -> str:
    """Check `args.ref` of `args.url` out into `args.dest`; the commit's id."""
    deadline = Deadline(args.timeout_s)
    env = _git_environment(args)
    dest = Path(args.dest)
    _prepare_destination(dest)

    _git(["init", "-q", "--template=", str(dest)], env, deadline, cwd=None)
    _git(["remote", "add", "origin", args.url], env, deadline, cwd=dest)
    ref = args.ref or "HEAD"
    try:
        _git(["fetch", "--depth", "1", "--no-tags", "origin", ref], env, deadline, dest)
        target = "FETCH_HEAD"
    except CloneFailed as failure:
        # Hosts may refuse a commit by id (or never advertise it), and a short
        # id is never a ref on the wire: look the commit up in a full fetch.
        if failure.code != EXIT_BAD_REF or not _SHA.match(ref):
            raise
        target = _fetch_everything_for(ref, env, deadline, dest)

    _git(["checkout", "-q", "--detach", target], env, deadline, dest)
    commit = _git(["rev-parse", "HEAD"], env, deadline, dest).strip()
    # FETCH_HEAD only names the URL, but nothing of the fetch needs to stay.
    (dest / ".git" / "FETCH_HEAD").unlink(missing_ok=True)
    return commit


def _fetch_everything_for(ref: str, env, deadline: Deadline, dest: Path) -> str:
    _git(
        [
            "fetch",
            "--no-tags",
            "origin",
            "+refs/heads/*:refs/remotes/origin/*",
            "+refs/tags/*:refs/tags/*",
        ],
        env,
        deadline,
        dest,
    )
    try:
        found = _git(
            [
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                f"{ref}^{{commit}}",
            ],
            env,
            deadline,
            dest,
        )
    except CloneFailed:
        raise CloneFailed(EXIT_BAD_REF) from None
    return found.strip()


def _git(args: list[str], env: dict[str, str], deadline: Deadline, cwd) -> str:
    """Run one git command within the deadline; its stdout, or `CloneFailed`."""
    global _current
    argv = ["git", *GIT_OPTIONS, *args]
    try:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # A group of its own, so that a timeout also ends git's helpers
            # (git-remote-https, the askpass program).
            start_new_session=True,
        )
    except OSError as exc:
        raise CloneFailed(EXIT_GIT_FAILED) from exc
    _current = process
    try:
        stdout, stderr = process.communicate(timeout=deadline.remaining())
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise CloneFailed(EXIT_TIMEOUT) from None
    finally:
        _current = None
    if process.returncode != 0:
        raise CloneFailed(classify(stderr.decode("utf-8", "replace"), env))
    return stdout.decode("utf-8", "replace")


def classify(stderr: str, env: dict[str, str]) -> int:
    """The exit code for a failed git command, from what git printed."""
    text = stderr.lower()
    with_token = "GIT_ASKPASS" in env
    if "no space left on device" in text or "disk quota exceeded" in text:
        return EXIT_NO_SPACE
    if "from proxy after connect" in text or "could not resolve" in text:
        return EXIT_NETWORK
    if "authentication failed" in text or "invalid username or password" in text:
        return EXIT_AUTH_DENIED
    if "could not read username" in text or "could not read password" in text:
        # Without a token a private repository and a missing one look alike.
        return EXIT_AUTH_DENIED if with_token else EXIT_NOT_FOUND
    if (
        "couldn't find remote ref" in text
        or "not our ref" in text
        or "unadvertised object" in text
        or "no such remote ref" in text
    ):
        return EXIT_BAD_REF
    if ("repository" in text and "not found" in text) or "returned error: 404" in text:
        return EXIT_NOT_FOUND
    if "returned error: 401" in text or "returned error: 403" in text:
        return EXIT_AUTH_DENIED if with_token else EXIT_NOT_FOUND
    if "unable to access" in text or "failed to connect" in text or "ssl" in text:
        return EXIT_NETWORK
    return EXIT_GIT_FAILED


def _git_environment(args: argparse.Namespace) -> dict[str, str]:
    """A clean environment: nothing of ours leaks to git but what it needs."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": "/nonexistent",
        "LC_ALL": "C",
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }
    for name in PROXY_VARIABLES:
        if os.environ.get(name):
            env[name] = os.environ[name]
    ca_bundle = (
        args.ca_bundle
        or os.environ.get("GIT_SSL_CAINFO")
        or os.environ.get("SSL_CERT_FILE")
    )
    if ca_bundle:
        env["GIT_SSL_CAINFO"] = ca_bundle
    if args.token_file:
        env["GIT_ASKPASS"] = str(args.askpass)
        env["ENCLAVE_GIT_TOKEN_FILE"] = args.token_file
        env["ENCLAVE_GIT_HOST"] = urlsplit(args.url).netloc.lower()
        env["ENCLAVE_GIT_USERNAME"] = args.username
    return env


def _prepare_destination(dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        empty = not any(dest.iterdir())
    except OSError as exc:
        code = EXIT_NO_SPACE if exc.errno == errno.ENOSPC else EXIT_USAGE
        raise CloneFailed(code) from exc
    if not empty:
        raise CloneFailed(EXIT_USAGE)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check a git repository out.")
    parser.add_argument("--url", required=True, type=_url)
    parser.add_argument("--ref", type=_ref)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--timeout-s", required=True, type=_positive)
    parser.add_argument("--token-file")
    parser.add_argument("--username", default="x-access-token")
    parser.add_argument("--ca-bundle")
    parser.add_argument("--askpass", default=str(ASKPASS))
    return parser.parse_args(argv)


def _url(value: str) -> str:
    parts = urlsplit(value)
    segments = parts.path.removesuffix("/").split("/")
    valid = (
        parts.scheme == "https"
        and parts.hostname
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
        and "%" not in parts.path
        and len(segments) == 3
        and all(_OWNER_OR_NAME.match(s) for s in segments[1:])
    )
    if not valid:
        # argparse quotes the value in its message; a URL with a password in
        # it must not be echoed anywhere.
        raise argparse.ArgumentTypeError("not https://<host>/<owner>/<repository>")
    return value


def _ref(value: str) -> str:
    bad = (
        not value
        or len(value) > 255
        or _REF_FORBIDDEN.search(value)
        or value.startswith(("-", "+", "/", "."))
        or value.endswith(("/", ".", ".lock"))
        or any(part in value for part in ("..", "//", "/.", "@{"))
        or value == "@"
    )
    if bad:
        raise argparse.ArgumentTypeError("not a valid branch, tag or commit name")
    return value


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _terminated(signum, frame) -> None:
    # The backend stops the clone step with SIGTERM when the session is torn
    # down or out of time; git's helpers must not outlive it.
    if _current is not None:
        _kill_group(_current)
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
