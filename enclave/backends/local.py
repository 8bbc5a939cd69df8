"""The `local` backend: each session runs under bubblewrap on the worker's host.

Lifecycle of `launch`, which runs in an RQ worker and blocks until the end:

1. Make the session's state directory `<state_dir>/<session_id>`. It appears
   (by a rename) already holding a locked `lock` file, so that a `teardown` in
   any process can tell a live launch from leftovers. It holds a record of the
   session's cgroup and of the host pids of bwrap and of the sandbox's init;
   nothing in it is ever shown to the sandbox.
2. Make the session's cgroup (see `enclave.backends.cgroups`) with its memory,
   pids and CPU limits, when the host lets the worker make one; otherwise the
   limits fall back to rlimits, which `health()` says plainly.
3. Start bwrap in a process group of its own. Between fork and exec the child
   joins the cgroup, sets its rlimits and, when the worker is root, drops to
   an unprivileged host uid of the session's own, so that nothing of the
   session ever runs as host root. bwrap then builds the sandbox: new user,
   pid, network, IPC, UTS and cgroup namespaces, no capabilities, no nested
   user namespaces, a read-only root (the image's root filesystem, or a
   handful of host directories with a synthesized `/etc`), size-limited tmpfs
   for `/tmp`, `/workspace` and `/dev/shm`, a fresh `/proc`, a minimal `/dev`,
   and the code as a read-only file. Code and synthesized files travel through
   memfds, so the code never touches the host's disk. A session with egress
   also gets its egress directory (prepared by the worker's job, see
   `enclave.egress.sandbox`) read-only at `/run/enclave`, and its code starts
   through the relay there, which listens on the sandbox's 127.0.0.1:3128.
4. The calling thread streams stdout and stderr to the sink as they are read,
   and kills the session when the wall clock runs out, the cgroup's CPU time
   passes `cpu_s`, the sink refuses more output, or a teardown marks the
   state directory. A kill empties the cgroup and kills bwrap's process group
   and the sandbox's init, whose death ends its whole pid namespace; should
   the worker itself die, bwrap's `--die-with-parent` does the same.
5. Once bwrap has been reaped, both pipes are closed and the sandbox's init is
   gone, the result is worked out (our own kill reason first, then a
   teardown, the cgroup's OOM counter, CPU time, and finally the exit status,
   where 128 + n means signal n), the cgroup and the state directory are
   removed, and only then is `result` reported.

A session with a git source runs its clone step first, in a bubblewrap
sandbox of its own made the same way (same uid, cgroup and limits), between
steps 2 and 3. Its `/workspace` is the session's checkout directory (a tmpfs
of `disk_mb` mounted on the host when the worker is root), its network the
clone's own egress directory (prepared by the worker's job, allowing the git
host alone), and the token a file at `/run/enclave-git/token` that bwrap
fills from a memfd: it touches no disk and exists in that sandbox alone. The
workload then gets the same checkout bound at `/workspace`, its working
directory, and its code at `/run/enclave-code/` instead. The clone's time
counts against `timeout_s`: the workload gets what is left.

`teardown` marks the state directory, kills through the recorded cgroup and
pid, waits (bounded) for a running `launch` to let go of its lock, and then
removes whatever is left, the session's egress directory included. It is
idempotent and needs nothing but the state directory and the settings, so any
process of the deployment can call it.

Module constants stand in for settings this backend would otherwise need: the
bwrap binary, the range of host uids sessions run as, and the host files
exposed in place of an image.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from enclave.backends import cgroups
from enclave.backends.base import (
    CLONE_EGRESS_SUFFIX,
    BackendEventSink,
    BackendHealth,
)
from enclave.broker.clone import (
    PROGRAM_DIR,
    TOKEN_DIR,
    TOKEN_FILE_NAME,
    CloneStep,
    describe_clone_failure,
)
from enclave.egress import sandbox as egress
from enclave.sandbox import clone_step
from enclave.sessions.spec import KillReason, LaunchSpec, Limits, Phase, SessionResult

logger = logging.getLogger(__name__)

BWRAP = "bwrap"
WORKDIR = "/workspace"
# With a git source the checkout is the working directory, so the code lives
# apart from it.
SOURCE_CODE_DIR = "/run/enclave-code"
# Sessions' checkouts, under the egress sessions directory: like the egress
# directories, bwrap binds them as the session's uid, which must reach them.
CHECKOUTS_DIR = ".checkouts"
# The clone step gets this much less than the time left, so that it reports
# its own timeout before the backend has to kill it.
CLONE_GRACE_S = 2.0

# The uid and gid the code sees inside its user namespace.
SANDBOX_UID = 1000
SANDBOX_USER = "sandbox"

# When the worker is root, each session runs as a host uid of its own from
# this range (derived from its id), so that no two sessions share a uid's
# process count, and none is an account of the host.
SANDBOX_HOST_UID_BASE = 2_000_000_000
SANDBOX_HOST_UID_SPAN = 100_000_000

# bwrap's monitor and its init process in the pid namespace count against the
# pids limit beside the workload's own processes.
BWRAP_PROCESSES = 2

# Mirrors the docker backend, so that code sees the same environment on both.
SANDBOX_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": WORKDIR,
    "TMPDIR": "/tmp",
    "USER": SANDBOX_USER,
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}

# Interpreter names looked up in the sandbox's root, its arguments, and the
# file name the code gets in the working directory.
INTERPRETERS = {
    "python": (("python3",), ("-u",), "main.py"),
    "node": (("node", "nodejs"), (), "main.js"),
}
SEARCH_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")

# Without an image, the sandbox's root is these host paths, read-only. /etc is
# never bound whole: it holds the host's secrets (shadow, keys, credentials of
# services), so only what the interpreters need is taken from it.
HOST_ROOT_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
HOST_ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "protocols",
    "python3*",
    "services",
    "ssl/certs",
)
SYNTHESIZED_ETC = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}::{WORKDIR}:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": (f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"),
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n",
    "hostname": "sandbox\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOCK_FILE = "lock"
RECORD_FILE = "session.json"
TEARDOWN_MARKER = "torn-down"

POLL_S = 0.1
READ_CHUNK_BYTES = 64 * 1024
# After a kill: how long to wait for bwrap to be reaped and the pipes to close.
KILL_WAIT_S = 5.0
# After bwrap exits on its own: how long a pipe may stay open (it cannot, with
# the pid namespace gone, but a bound keeps launch from hanging regardless).
DRAIN_WAIT_S = 2.0
# How long `teardown` waits for a running launch to finish on its own.
TEARDOWN_WAIT_S = 10.0
HEALTH_TIMEOUT_S = 15.0


class SetupError(Exception):
    """The sandbox could not be prepared; the message is safe to show the caller."""


@dataclass
class _Session:
    """What one launch holds on the host until it ends."""

    spec: LaunchSpec
    directory: Path
    lock_fd: int
    host_uid: int | None
    cgroup: cgroups.SessionCgroup | None = None
    argv: list[str] = field(default_factory=list)
    # Passed to bwrap, and closed here once it runs.
    fds: list[int] = field(default_factory=list)
    # Where bwrap says which host pid its init process in the sandbox has.
    info_fd: int | None = None
    # bwrap's pid and its init's, with start times (see `_start_time`).
    record: dict = field(default_factory=dict)
    # The session's egress directory and the relay's interpreter, with egress.
    egress_dir: Path | None = None
    relay_python: str | None = None
    # With a git source: the checkout on the host, the clone step's egress
    # directory and the token (None for a public repository).
    checkout: Path | None = None
    checkout_mounted: bool = False
    clone_egress_dir: Path | None = None
    git_token: str | None = field(default=None, repr=False)
    # When the session's time runs out (monotonic), clone included.
    deadline: float | None = None

    def torn_down(self) -> bool:
        marked = (self.directory / TEARDOWN_MARKER).exists()
        return marked or not self.directory.is_dir()

    def write_record(self, **values) -> None:
        self.record.update(values)
        self.record["cgroup"] = self.cgroup.record() if self.cgroup else None
        temporary = self.directory / (RECORD_FILE + ".new")
        temporary.write_text(json.dumps(self.record))
        os.replace(temporary, self.directory / RECORD_FILE)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


@dataclass
class _Outcome:
    """How the sandbox's process ended, as seen from the launch loop."""

    status: int | None = None
    rusage: resource.struct_rusage | None = None
    ended_at: float | None = None
    kill_reason: KillReason | None = None
    status_lost: bool = False


class LocalBackend:
    """Runs each session under bubblewrap on this host."""

    name = "local"

    def __init__(self, settings, *, use_cgroups: bool = True) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.rootfs = settings.sandbox_rootfs or None
        self.use_cgroups = use_cgroups
        self._layout_lock = threading.Lock()
        self._layout: tuple[cgroups.CgroupLayout | None, str] | None = None

    # -- the protocol ---------------------------------------------------------

    def launch(
        self, spec: LaunchSpec, sink: BackendEventSink, *, credentials=None
    ) -> None:
        """Run the session; `credentials` (a `SessionCredentials`) for a git source.

        Only its `clone_proxy` (whose user names the clone's egress
        directory) and `git_token` are used: the workload's proxy
        credentials are in its own egress directory already.
        """
        sink.phase(Phase.PROVISIONING)
        deadline = time.monotonic() + spec.limits.timeout_s
        try:
            session = self._prepare(spec, credentials, deadline)
        except SetupError as exc:
            logger.warning(
                "session could not start session_id=%s backend=local error=%s",
                spec.session_id,
                exc,
            )
            sink.result(SessionResult.failed(str(exc)))
            return

        try:
            result = self._run(session, sink)
        finally:
            self._release(session)

        sink.result(result)

    def teardown(self, session_id: str) -> None:
        if not SESSION_ID.match(session_id):
            logger.debug("teardown of an impossible session id ignored")
            return

        directory = self.state_dir / session_id
        # The marker goes first, so that a launch seeing its process die can
        # tell this kill from any other.
        with contextlib.suppress(OSError):
            (directory / TEARDOWN_MARKER).touch()
        record = _read_record(directory)
        cgroup = self._recorded_cgroup(session_id, record)
        _kill_session(cgroup, record)

        free, lock_fd = _take_lock(directory, TEARDOWN_WAIT_S)
        if not free:
            logger.warning(
                "launch still running after teardown, removing its state anyway "
                "session_id=%s",
                session_id,
            )
        try:
            # Whatever a finished or vanished launch left behind.
            _kill_session(cgroup, _read_record(directory))
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(directory, ignore_errors=True)
            for leftover in glob.glob(str(self.state_dir / f".{session_id}.*")):
                shutil.rmtree(leftover, ignore_errors=True)
            remove_checkout(self._checkout_path(session_id))
            egress.remove_session_directory(self.settings, session_id)
            egress.remove_session_directory(
                self.settings, session_id + CLONE_EGRESS_SUFFIX
            )
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        logger.info("session torn down session_id=%s backend=local", session_id)

    def health(self) -> BackendHealth:
        bwrap = shutil.which(BWRAP)
        if bwrap is None:
            return BackendHealth(False, "bwrap is not installed")

        layout, reason = self._cgroups()
        if layout is not None:
            limits = f"limits by {layout.describe()}, rlimits for CPU time"
        else:
            limits = (
                "limits by rlimits only, no cgroup could be made "
                f"({reason}): memory by RLIMIT_DATA (an allocation failure is "
                "the program's own exit, not killed/memory), processes by "
                "RLIMIT_NPROC, CPU time by RLIMIT_CPU, no CPU bandwidth limit"
            )
        who = (
            "as per-session unprivileged host uids"
            if os.geteuid() == 0
            else f"as the worker's own uid {os.getuid()}"
        )

        problem = self._probe(bwrap)
        if problem:
            return BackendHealth(False, f"bwrap does not work: {problem}; {limits}")
        version = _bwrap_version(bwrap)
        return BackendHealth(True, f"{version} runs sandboxes {who}; {limits}")

    # -- launching ------------------------------------------------------------

    def _prepare(self, spec: LaunchSpec, credentials, deadline: float) -> _Session:
        if not SESSION_ID.match(spec.session_id):
            raise SetupError("the session id is not usable as a sandbox name")
        if spec.language not in INTERPRETERS:
            raise SetupError(f"language {spec.language!r} is not supported")
        interpreter = self._interpreter(spec.language)
        egress_dir, relay_python = self._egress(spec)
        clone_egress_dir = self._clone_egress(spec, credentials)

        lock_fd, directory = self._make_state_directory(spec.session_id)
        host_uid = sandbox_host_uid(spec.session_id) if os.geteuid() == 0 else None
        session = _Session(
            spec=spec,
            directory=directory,
            lock_fd=lock_fd,
            host_uid=host_uid,
            egress_dir=egress_dir,
            relay_python=relay_python,
            clone_egress_dir=clone_egress_dir,
            git_token=getattr(credentials, "git_token", None),
            deadline=deadline,
        )
        try:
            sandbox_uid = host_uid if host_uid is not None else os.getuid()
            if egress_dir is not None:
                egress.hand_over(egress_dir, sandbox_uid)
            if clone_egress_dir is not None:
                egress.hand_over(clone_egress_dir, sandbox_uid)
                self._make_checkout(session, sandbox_uid)
            layout, _ = self._cgroups()
            if layout is not None:
                try:
                    session.cgroup = layout.create(
                        spec.session_id, spec.limits, extra_pids=BWRAP_PROCESSES
                    )
                except cgroups.CgroupError as exc:
                    raise SetupError(str(exc)) from exc
            session.write_record()
            session.argv = self._command(spec, interpreter, session)
        except BaseException:
            self._release(session)
            raise
        return session

    def _run(self, session: _Session, sink: BackendEventSink) -> SessionResult:
        spec = session.spec
        setup = _child_setup(
            join_files=session.cgroup.join_files() if session.cgroup else [],
            rlimits=_rlimits(
                spec.limits, session.host_uid, fallback=session.cgroup is None
            ),
            uid=session.host_uid,
        )
        if session.torn_down():
            # Torn down between taking the state directory and now.
            return SessionResult.killed(KillReason.TEARDOWN, duration_ms=0)
        if spec.source is not None:
            failed = self._clone(session, setup)
            if failed is not None:
                return failed
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                session.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                # bwrap's own environment shows in the sandbox as /proc/1/environ.
                env={},
                pass_fds=tuple(session.fds),
                start_new_session=True,
                # The child must be in the cgroup and no longer root before bwrap
                # runs a single instruction; only a hook between fork and exec can
                # do both. It calls nothing that takes a lock another thread of
                # the worker could hold at fork time.
                preexec_fn=setup,  # noqa: PLW1509
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.exception("bwrap could not start session_id=%s", spec.session_id)
            return SessionResult.failed(f"the sandbox could not start: {exc}")
        finally:
            session.close_fds()

        session.write_record(pid=process.pid, start_time=_start_time(process.pid))
        logger.info(
            "session started session_id=%s org_id=%s backend=local language=%s "
            "host_uid=%s cgroup=%s",
            spec.session_id,
            spec.org_id,
            spec.language,
            session.host_uid,
            session.cgroup.version if session.cgroup else None,
        )
        sink.phase(Phase.RUNNING)

        feeder = threading.Thread(
            target=_feed_stdin,
            args=(process.stdin, (spec.stdin or "").encode()),
            name=f"stdin-{spec.session_id}",
            daemon=True,
        )
        feeder.start()
        try:
            outcome = self._watch(session, process, sink, started)
        finally:
            # Whatever happened in the loop, nothing of the session may outlive it.
            _kill_session(session.cgroup, session.record, process)
            for pipe in (process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
        feeder.join(timeout=1.0)
        # bwrap's monitor exits as soon as its init reports the exit status,
        # while init may still be taking the rest of the pid namespace down.
        _wait_until_gone(session.record, DRAIN_WAIT_S)

        return _result(session, outcome, started)

    def _watch(
        self,
        session: _Session,
        process: subprocess.Popen,
        sink: BackendEventSink,
        started: float,
    ) -> _Outcome:
        """Stream output and enforce the limits until the session is over."""
        limits = session.spec.limits
        deadline = session.deadline or started + limits.timeout_s
        outcome = _Outcome()
        killed_at: float | None = None
        muted = False

        selector = selectors.DefaultSelector()
        for pipe, deliver in (
            (process.stdout, sink.stdout),
            (process.stderr, sink.stderr),
        ):
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            selector.register(pipe.fileno(), selectors.EVENT_READ, (deliver, decoder))
        info = bytearray()
        if session.info_fd is not None:
            selector.register(session.info_fd, selectors.EVENT_READ, None)

        def kill(reason: KillReason) -> None:
            nonlocal killed_at
            if outcome.kill_reason is None:
                outcome.kill_reason = reason
                killed_at = time.monotonic()
                logger.info(
                    "killing session session_id=%s backend=local reason=%s",
                    session.spec.session_id,
                    reason.value,
                )
                _kill_session(session.cgroup, session.record, process)

        with selector:
            while True:
                streams_open = bool(selector.get_map())
                if streams_open:
                    ready = selector.select(POLL_S)
                else:
                    ready = []
                    time.sleep(POLL_S)
                for key, _ in ready:
                    data = os.read(key.fd, READ_CHUNK_BYTES)
                    final = not data
                    if final:
                        selector.unregister(key.fd)
                    if key.data is None:
                        info += data
                        if final:
                            _note_init(session, bytes(info))
                        continue
                    deliver, decoder = key.data
                    text = decoder.decode(data, final=final)
                    if text and not muted and not deliver(text):
                        # The sink keeps what fits; the rest is read and dropped
                        # so that the process is never stuck on a full pipe.
                        muted = True
                        kill(KillReason.OUTPUT_LIMIT)

                if outcome.ended_at is None:
                    _reap(process, outcome, os.WNOHANG)
                if outcome.ended_at is not None and not selector.get_map():
                    break

                now = time.monotonic()
                if outcome.kill_reason is None and outcome.ended_at is None:
                    if now >= deadline:
                        kill(KillReason.TIMEOUT)
                    elif session.torn_down():
                        kill(KillReason.TEARDOWN)
                    elif _cpu_exceeded(session.cgroup, limits):
                        kill(KillReason.CPU)
                if killed_at is not None and now - killed_at > KILL_WAIT_S:
                    logger.warning(
                        "session did not end after a kill session_id=%s",
                        session.spec.session_id,
                    )
                    break
                if (
                    outcome.ended_at is not None
                    and now - outcome.ended_at > DRAIN_WAIT_S
                ):
                    break

        if outcome.ended_at is None:
            _kill_session(session.cgroup, session.record, process)
            _reap(process, outcome, 0)
        return outcome

    def _release(self, session: _Session) -> None:
        """Remove the session's cgroup and state; the lock goes last."""
        session.close_fds()
        if session.info_fd is not None:
            os.close(session.info_fd)
            session.info_fd = None
        try:
            if session.cgroup is not None:
                session.cgroup.kill()
                if not session.cgroup.remove():
                    logger.error(
                        "session cgroup left behind session_id=%s paths=%s",
                        session.spec.session_id,
                        session.cgroup.directories,
                    )
            shutil.rmtree(session.directory, ignore_errors=True)
            if session.checkout is not None:
                remove_checkout(session.checkout)
        finally:
            os.close(session.lock_fd)

    def _make_state_directory(self, session_id: str) -> tuple[int, Path]:
        """Create `<state_dir>/<session_id>` holding a lock this process holds."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = self.state_dir / session_id
        if directory.exists():
            free, held = _take_lock(directory, 0)
            if not free:
                raise SetupError("a sandbox of this session is already running")
            if held is not None:
                os.close(held)
            # A launch that died without cleaning up; take its leftovers away.
            self.teardown(session_id)

        staging = Path(tempfile.mkdtemp(prefix=f".{session_id}.", dir=self.state_dir))
        lock_fd = os.open(
            staging / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            os.rename(staging, directory)
        except OSError as exc:
            os.close(lock_fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise SetupError("a sandbox of this session is already running") from exc
        return lock_fd, directory

    # -- the clone step -------------------------------------------------------

    def _clone_egress(self, spec: LaunchSpec, credentials) -> Path | None:
        """The clone step's egress directory, for a session with a git source."""
        if spec.source is None:
            return None
        clone_proxy = getattr(credentials, "clone_proxy", None)
        directory = None
        if clone_proxy is not None:
            directory = egress.prepared_directory(self.settings, clone_proxy.username)
        if directory is None:
            raise SetupError(
                "the git source cannot be cloned: the clone step's network access "
                "was not prepared"
            )
        if self._find_in_root(("git",)) is None:
            raise SetupError("the clone step needs git in the sandbox's root")
        if self._find_in_root(("python3",)) is None:
            raise SetupError("the clone step needs python3 in the sandbox's root")
        if self.rootfs and not os.path.isfile(
            os.path.join(self.rootfs, PROGRAM_DIR.lstrip("/"), "clone_step.py")
        ):
            raise SetupError(
                f"the sandbox root filesystem lacks {PROGRAM_DIR}/clone_step.py; "
                "rebuild it with enclave/sandbox/build-image.sh"
            )
        if os.geteuid() == 0 and not egress.reachable_by_all(directory):
            raise SetupError(
                "the clone's egress directory is out of the sandbox's reach: "
                "every directory above ENCLAVE_EGRESS_SESSIONS_DIR needs o+x"
            )
        return directory

    def _checkout_path(self, session_id: str) -> Path:
        return egress.sessions_directory(self.settings) / CHECKOUTS_DIR / session_id

    def _make_checkout(self, session: _Session, uid: int) -> None:
        """The session's empty checkout directory, a tmpfs of `disk_mb` as root."""
        path = self._checkout_path(session.spec.session_id)
        path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        remove_checkout(path)
        path.mkdir(mode=0o700)
        session.checkout = path
        try:
            session.checkout_mounted = mount_checkout(
                path, session.spec.limits.disk_mb, uid
            )
        except OSError as exc:
            raise SetupError(str(exc)) from exc

    def _clone(self, session: _Session, setup) -> SessionResult | None:
        """Run the clone step to its end; a result when the session cannot go on."""
        spec = session.spec
        source = spec.source
        started = time.monotonic()
        left = session.deadline - started
        with_token = session.git_token is not None
        step = CloneStep(
            url=source.url,
            ref=source.ref,
            dest=WORKDIR,
            timeout_s=max(1.0, left - CLONE_GRACE_S),
            token_file=f"{TOKEN_DIR}/{TOKEN_FILE_NAME}" if with_token else None,
            python=self._find_in_root(("python3",)),
        )
        fds: list[int] = []
        extra: tuple[str, ...] = ()
        if not self.rootfs:
            extra += ("--ro-bind", str(egress.SANDBOX_SOURCES), PROGRAM_DIR)
        if with_token:
            # The token reaches bwrap through a memfd and lands in a file of
            # this sandbox alone; the workload's sandbox never has it.
            token_fd = _memfd("git-token", session.git_token, fds)
            path = f"{TOKEN_DIR}/{TOKEN_FILE_NAME}"
            extra += ("--perms", "0400", "--ro-bind-data", str(token_fd), path)
        argv = self._bwrap_arguments(
            spec.limits,
            fds,
            session.clone_egress_dir,
            workspace=session.checkout,
            extra_run=extra,
        )
        argv += egress.relay_command(step.python) + step.argv()

        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={},
                pass_fds=tuple(fds),
                start_new_session=True,
                preexec_fn=setup,  # noqa: PLW1509 - see `_run`
            )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.exception(
                "clone step could not start session_id=%s", spec.session_id
            )
            return SessionResult.failed(f"the clone step could not start: {exc}")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        session.write_record(pid=process.pid, start_time=_start_time(process.pid))

        reason = None
        while process.poll() is None:
            if session.torn_down():
                reason = KillReason.TEARDOWN
            elif time.monotonic() >= session.deadline:
                reason = KillReason.TIMEOUT
            if reason is not None:
                _kill_session(session.cgroup, session.record, process)
                process.wait()
                break
            time.sleep(POLL_S)
        output = process.stdout.read(64 * 1024).decode(errors="replace")
        process.stdout.close()
        duration_ms = int((time.monotonic() - started) * 1000)

        if reason is KillReason.TEARDOWN or session.torn_down():
            return SessionResult.killed(KillReason.TEARDOWN, duration_ms=duration_ms)
        code = clone_step.EXIT_TIMEOUT if reason is not None else process.returncode
        if code == clone_step.EXIT_OK:
            logger.info(
                "clone finished session_id=%s backend=local duration_ms=%s commit=%s",
                spec.session_id,
                duration_ms,
                _commit_of(output),
            )
            return None
        error = describe_clone_failure(
            code,
            url=source.url,
            ref=source.ref,
            timeout_s=step.timeout_s,
            with_token=with_token,
        )
        logger.info(
            "clone failed session_id=%s backend=local exit_code=%s duration_ms=%s",
            spec.session_id,
            code,
            duration_ms,
        )
        return SessionResult.failed(error, duration_ms=duration_ms)

    # -- the sandbox ----------------------------------------------------------

    def _command(
        self, spec: LaunchSpec, interpreter: str, session: _Session
    ) -> list[str]:
        _, arguments, filename = INTERPRETERS[spec.language]
        code_fd = _memfd("code", spec.code, session.fds)
        if session.checkout is None:
            code_path = f"{WORKDIR}/{filename}"
            code_bind: tuple[str, ...] = ()
        else:
            code_path = f"{SOURCE_CODE_DIR}/{filename}"
            code_bind = ("--ro-bind-data", str(code_fd), code_path)
        argv = self._bwrap_arguments(
            spec.limits,
            session.fds,
            session.egress_dir,
            workspace=session.checkout,
            extra_run=code_bind,
        )
        session.info_fd, info_writer = os.pipe2(os.O_CLOEXEC)
        session.fds.append(info_writer)
        argv += ["--info-fd", str(info_writer)]
        if not code_bind:
            argv += ["--ro-bind-data", str(code_fd), code_path]
        if session.relay_python is not None:
            argv += egress.relay_command(session.relay_python)
        argv += [interpreter, *arguments, code_path]
        return argv

    def _bwrap_arguments(
        self,
        limits: Limits,
        fds: list[int],
        egress_dir: Path | None = None,
        *,
        workspace: Path | None = None,
        extra_run: tuple[str, ...] = (),
    ) -> list[str]:
        """bwrap's options up to the code and command: namespaces, mounts, env.

        `workspace` is a host directory bound at `/workspace` instead of a
        fresh tmpfs (the checkout of a git source); `extra_run` are bwrap
        options that place more read-only files under `/run`.
        """
        disk = str(max(1, int(limits.disk_mb)) * 1024 * 1024)
        argv = [
            shutil.which(BWRAP) or BWRAP,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "sandbox",
        ]
        # TODO: no seccomp filter yet: the code may make any system call an
        # unprivileged process may, so the kernel surface it reaches is wider
        # than under Docker's default profile (bwrap takes one with --seccomp).
        argv += self._root_arguments(fds)
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "1777", "--size", disk, "--tmpfs", "/dev/shm"]
        # bwrap's /dev is itself a writable tmpfs without a size; read-only, it
        # cannot serve as a way around the disk limit.
        argv += ["--remount-ro", "/dev"]
        argv += ["--perms", "1777", "--size", disk, "--tmpfs", "/tmp"]
        if workspace is None:
            argv += ["--perms", "0755", "--size", disk, "--tmpfs", WORKDIR]
        else:
            # Sized on the host (a tmpfs of disk_mb) when the worker is root.
            argv += ["--bind", str(workspace), WORKDIR]
        if egress_dir is not None or extra_run:
            # /run is empty but for what is placed in it here, and read-only
            # once the mount points exist in it.
            argv += ["--perms", "0755", "--size", "65536", "--tmpfs", "/run"]
            if egress_dir is not None:
                argv += ["--ro-bind", str(egress_dir), egress.MOUNT_POINT]
            argv += list(extra_run)
            argv += ["--remount-ro", "/run"]
        if not self.rootfs:
            argv += ["--remount-ro", "/"]
        argv += ["--chdir", WORKDIR, "--clearenv"]
        for name, value in SANDBOX_ENVIRONMENT.items():
            argv += ["--setenv", name, value]
        return argv

    def _root_arguments(self, fds: list[int]) -> list[str]:
        if self.rootfs:
            return ["--ro-bind", self.rootfs, "/"]

        argv: list[str] = []
        for name in HOST_ROOT_DIRS:
            path = "/" + name
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--dir", "/etc"]
        for pattern in HOST_ETC_ENTRIES:
            for path in sorted(glob.glob(os.path.join("/etc", pattern))):
                argv += ["--ro-bind", path, path]
        for name, content in SYNTHESIZED_ETC.items():
            argv += ["--ro-bind-data", str(_memfd(name, content, fds)), f"/etc/{name}"]
        return argv

    def _egress(self, spec: LaunchSpec) -> tuple[Path | None, str | None]:
        """The session's egress directory and the relay's interpreter, if any."""
        if not spec.egress.allow:
            return None, None
        directory = egress.prepared_directory(self.settings, spec.session_id)
        if directory is None:
            # Fail closed: the code must not run believing it has a network.
            raise SetupError("the session's network access was not prepared")
        python = self._find_in_root(("python3",))
        if python is None:
            raise SetupError("the egress relay needs python3 in the sandbox's root")
        if os.geteuid() == 0 and not egress.reachable_by_all(directory):
            # bwrap binds it as the session's uid, which must pass through
            # every directory above it.
            raise SetupError(
                "the egress directory is out of the sandbox's reach: every "
                "directory above ENCLAVE_EGRESS_SESSIONS_DIR needs o+x"
            )
        return directory, python

    def _interpreter(self, language: str) -> str:
        names, _, _ = INTERPRETERS[language]
        found = self._find_in_root(names)
        if found is None:
            where = self.rootfs or "the host"
            raise SetupError(f"no {language} interpreter in {where}")
        if self.rootfs:
            for needed in (WORKDIR, "/tmp", "/proc", "/dev"):
                if not os.path.isdir(os.path.join(self.rootfs, needed.lstrip("/"))):
                    raise SetupError(f"the sandbox root filesystem lacks {needed}")
        return found

    def _find_in_root(self, names) -> str | None:
        root = self.rootfs or "/"
        for directory in SEARCH_DIRS:
            for name in names:
                path = f"{directory}/{name}"
                if os.path.lexists(os.path.join(root, path.lstrip("/"))):
                    return path
        return None

    def _cgroups(self) -> tuple[cgroups.CgroupLayout | None, str]:
        with self._layout_lock:
            if self._layout is None:
                if self.use_cgroups:
                    self._layout = cgroups.detect()
                else:
                    self._layout = (None, "cgroups are turned off for this backend")
                layout, reason = self._layout
                if layout is None:
                    logger.warning("no session cgroups, rlimits only: %s", reason)
            return self._layout

    def _recorded_cgroup(
        self, session_id: str, record: dict | None
    ) -> cgroups.SessionCgroup | None:
        if record and record.get("cgroup"):
            found = cgroups.SessionCgroup.from_record(record["cgroup"], session_id)
            if found is not None:
                return found
        # No record (a launch that died early, or another process's): the
        # place this process would have used is the best guess.
        layout, _ = self._cgroups()
        if layout is None:
            return None
        guess = layout.session_cgroup(session_id)
        return guess if guess.exists() else None

    def _probe(self, bwrap: str) -> str | None:
        """Run a no-op in a sandbox made the way sessions are; a problem, or None."""
        target = self._find_in_root(("true",))
        if target is None:
            try:
                target = self._interpreter("python")
            except SetupError as exc:
                return str(exc)
        limits = Limits(
            timeout_s=HEALTH_TIMEOUT_S,
            cpu_s=5,
            memory_mb=64,
            cpus=1.0,
            pids=16,
            output_bytes=4096,
            disk_mb=1,
        )
        fds: list[int] = []
        host_uid = (
            sandbox_host_uid(f"health-{os.getpid()}") if os.geteuid() == 0 else None
        )
        try:
            argv = self._bwrap_arguments(limits, fds) + [target, "--version"]
            completed = subprocess.run(
                argv,
                check=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env={},
                pass_fds=tuple(fds),
                timeout=HEALTH_TIMEOUT_S,
                # As for sessions: the uid drop has to happen before bwrap runs.
                preexec_fn=_child_setup([], _rlimits(limits, host_uid, True), host_uid),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        finally:
            for fd in fds:
                os.close(fd)
        if completed.returncode != 0:
            message = completed.stderr.decode(errors="replace").strip()
            return message[-300:] or f"exit status {completed.returncode}"
        return None


def sandbox_host_uid(session_id: str) -> int:
    """The host uid a session's processes run as when the worker is root."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return (
        SANDBOX_HOST_UID_BASE
        + int.from_bytes(digest[:8], "big") % SANDBOX_HOST_UID_SPAN
    )


def _reap(process: subprocess.Popen, outcome: _Outcome, flags: int) -> None:
    """Collect bwrap's exit status and resource usage once it has exited."""
    try:
        pid, status, usage = os.wait4(process.pid, flags)
    except ChildProcessError:
        # Someone else reaped it (a worker that ignores SIGCHLD does that
        # implicitly): the process is gone, its status with it.
        pid, status, usage = process.pid, None, None
        outcome.status_lost = True
    if not pid:
        return
    outcome.status, outcome.rusage = status, usage
    outcome.ended_at = time.monotonic()
    process.returncode = -1 if status is None else os.waitstatus_to_exitcode(status)


def _result(session: _Session, outcome: _Outcome, started: float) -> SessionResult:
    limits = session.spec.limits
    duration_ms = int(((outcome.ended_at or time.monotonic()) - started) * 1000)
    if outcome.status_lost:
        if outcome.kill_reason is not None:
            return SessionResult.killed(outcome.kill_reason, duration_ms=duration_ms)
        return SessionResult.failed(
            "the sandbox's exit status was lost", duration_ms=duration_ms
        )
    code = os.waitstatus_to_exitcode(outcome.status)
    if code < 0:
        # bwrap itself died by a signal: ours, or one nobody here sent.
        exit_code, number = None, -code
    else:
        exit_code, number = code, _signal_of(code)

    reason = outcome.kill_reason
    if reason is None and session.torn_down():
        reason = KillReason.TEARDOWN
    # The kernel's own count, not a guess from SIGKILL: only an OOM kill that
    # ended the run (a non-zero exit) makes it a memory kill.
    oom = session.cgroup is not None and code != 0 and session.cgroup.oom_kills() > 0
    if reason is None and oom:
        reason = KillReason.MEMORY
    if reason is None and number is not None:
        if number == signal.SIGXCPU:
            reason = KillReason.CPU
        else:
            used = _cpu_used(session.cgroup, outcome.rusage)
            if used is not None and used >= limits.cpu_s:
                reason = KillReason.CPU

    if reason is not None:
        return SessionResult.killed(
            reason, exit_code=exit_code, signal=number, duration_ms=duration_ms
        )
    if exit_code is None:
        return SessionResult(phase=Phase.FAILED, signal=number, duration_ms=duration_ms)
    return SessionResult.exited(exit_code, duration_ms=duration_ms).replace(
        signal=number
    )


def _signal_of(code: int) -> int | None:
    """The signal behind bwrap's exit code, by its 128 + n rule.

    bwrap reports a workload that signal n ended as exit code 128 + n, the
    way shells do; a workload calling exit(128 + n) itself looks the same.
    """
    if 128 < code < 128 + signal.NSIG:
        return code - 128
    return None


def _cpu_exceeded(cgroup: cgroups.SessionCgroup | None, limits: Limits) -> bool:
    if cgroup is None:
        return False
    used = cgroup.cpu_seconds()
    return used is not None and used >= limits.cpu_s


def _cpu_used(
    cgroup: cgroups.SessionCgroup | None, usage: resource.struct_rusage | None
) -> float | None:
    if cgroup is not None:
        used = cgroup.cpu_seconds()
        if used is not None:
            return used
    if usage is None:
        return None
    # bwrap's init reaps every process of the pid namespace and bwrap reaps
    # it, so its children's usage covers the whole tree.
    return usage.ru_utime + usage.ru_stime


def _rlimits(
    limits: Limits, host_uid: int | None, fallback: bool
) -> list[tuple[int, tuple[int, int]]]:
    cpu = max(1, math.ceil(limits.cpu_s))
    # With a cgroup, CPU time is enforced on the whole tree by polling; the
    # per-process RLIMIT_CPU is a backstop a second later. Without, it is the
    # limit: SIGXCPU at the soft limit, SIGKILL a second after.
    cpu_soft = cpu if fallback else cpu + 1
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 4096 if nofile_hard == resource.RLIM_INFINITY else min(4096, nofile_hard)
    rlimits = [
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 1)),
        (resource.RLIMIT_NOFILE, (nofile, nofile)),
    ]
    if fallback:
        memory = int(limits.memory_mb) * 1024 * 1024
        processes = int(limits.pids) + BWRAP_PROCESSES
        if host_uid is None:
            # The count is per host uid, and without root the session shares
            # the worker's: leave room for what that uid already runs.
            processes += _processes_of(os.getuid())
        rlimits += [
            (resource.RLIMIT_DATA, (memory, memory)),
            (resource.RLIMIT_NPROC, (processes, processes)),
        ]
    return rlimits


def _child_setup(join_files: list[str], rlimits, uid: int | None):
    """The hook run in bwrap's process between fork and exec."""
    encoded_paths = [os.fsencode(path) for path in join_files]

    def setup() -> None:
        pid = str(os.getpid()).encode()
        for path in encoded_paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for which, values in rlimits:
            resource.setrlimit(which, values)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return setup


def _kill_session(
    cgroup: cgroups.SessionCgroup | None,
    record: dict | None,
    process: subprocess.Popen | None = None,
) -> None:
    """SIGKILL everything of a session that can still be found."""
    if process is not None and process.returncode is None:
        # bwrap leads its own process group; its --die-with-parent and the pid
        # namespace end whatever it started once it is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    elif record and _is_recorded_process(record, "pid", "start_time"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(record["pid"]), signal.SIGKILL)
    # Killing the sandbox's init takes its whole pid namespace with it.
    if record and _is_recorded_process(record, "init_pid", "init_start_time"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(record["init_pid"]), signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill()


def _is_recorded_process(record: dict, pid_key: str, start_key: str) -> bool:
    """Whether the recorded process still runs: same pid, same start time.

    The start time guards against a pid the kernel has since given to another
    process.
    """
    pid, start_time = record.get(pid_key), record.get(start_key)
    if pid is None or start_time is None:
        return False
    return _start_time(int(pid)) == start_time


def _note_init(session: _Session, info: bytes) -> None:
    """Record the host pid of the sandbox's init, from bwrap's --info-fd."""
    try:
        pid = int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        logger.warning("bwrap gave no init pid session_id=%s", session.spec.session_id)
        return
    session.write_record(init_pid=pid, init_start_time=_start_time(pid))


def _wait_until_gone(record: dict, wait_s: float) -> None:
    """Wait (bounded) until the sandbox's init has exited.

    A zombie counts as gone: the kernel has ended every other process of its
    pid namespace before init becomes one, and the host's init reaps it.
    """
    deadline = time.monotonic() + wait_s
    while _is_recorded_process(record, "init_pid", "init_start_time"):
        if _process_state(int(record["init_pid"])) == "Z":
            return
        if time.monotonic() > deadline:
            logger.warning("sandbox init still running pid=%s", record["init_pid"])
            return
        time.sleep(0.01)


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def _take_lock(directory: Path, wait_s: float) -> tuple[bool, int | None]:
    """Wait (bounded) until no launch holds the session's lock.

    Returns whether it is free and, when there was a lock file, the fd that
    now holds it (the caller closes it once done). A missing directory or lock
    file is free: there is no launch to wait for.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True, fd
        except BlockingIOError:
            os.close(fd)
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(0.05)


def _read_record(directory: Path) -> dict | None:
    try:
        return json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; fields follow the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


def _commit_of(output: str) -> str | None:
    """The commit id the clone step printed, if it printed one."""
    for line in reversed(output.splitlines()):
        try:
            return str(json.loads(line)["commit"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def mount_checkout(path: Path, disk_mb: int, uid: int) -> bool:
    """Make the empty directory `path` a tmpfs of `disk_mb` owned by `uid`.

    Returns False, leaving a plain directory, when the worker is not root;
    raises `OSError` when the mount fails. The docker backend uses it too.
    """
    if os.geteuid() != 0:
        # TODO: without root no tmpfs can be mounted, so the checkout is a
        # plain directory of the host's disk and disk_mb does not bound what
        # the clone and the workload write into it.
        if uid != os.getuid():
            # Nothing but the uid's own write access can be given away
            # without root: the checkout is then open to every local user.
            os.chmod(path, 0o777)
        return False
    size = max(1, int(disk_mb)) * 1024 * 1024
    options = f"size={size},mode=0755,uid={uid},gid={uid},nosuid,nodev"
    completed = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "enclave-checkout", str(path)],
        check=False,
        capture_output=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        timeout=30,
    )
    if completed.returncode != 0:
        raise OSError("the session's checkout directory could not be mounted")
    return True


def remove_checkout(path: Path) -> None:
    """Unmount (when mounted) and delete a session's checkout; idempotent."""
    if os.path.ismount(path):
        # Lazily: a process of the session still holding it must not keep the
        # mount (and its memory) alive once the session is over.
        subprocess.run(
            ["umount", "-l", str(path)],
            check=False,
            capture_output=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            timeout=30,
        )
    shutil.rmtree(path, ignore_errors=True)


def _memfd(name: str, content: str, fds: list[int]) -> int:
    """An anonymous in-memory file holding `content`, for bwrap's --ro-bind-data."""
    fd = os.memfd_create(name, 0)
    fds.append(fd)
    data = content.encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _feed_stdin(pipe, data: bytes) -> None:
    """Write the session's stdin and close it; a process that stops reading is fine."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(pipe.fileno(), view) :]
    except OSError:
        # EPIPE: the process exited or closed its stdin; the rest is not wanted.
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _bwrap_version(bwrap: str) -> str:
    try:
        completed = subprocess.run(
            [bwrap, "--version"], check=False, capture_output=True, timeout=10, env={}
        )
    except (OSError, subprocess.SubprocessError):
        return "bwrap"
    return completed.stdout.decode(errors="replace").strip() or "bwrap"
