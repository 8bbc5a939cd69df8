"""Per-session control groups for the `local` backend, on cgroup v1 or v2.

A session's cgroup holds every process of its sandbox, so that the kernel
enforces its memory, pids and CPU-bandwidth limits, counts its CPU time and
OOM kills, and lets the backend find (and kill) the whole tree, whatever it
forked, from any process.

Lifecycle:

1. `detect()` reads `/proc/self/mountinfo` and `/proc/self/cgroup` once and
   decides where session cgroups can live: on a cgroup v2 mount whose
   controllers the worker may use (its own cgroup, or the parent of it when the
   worker was started in a leaf of a delegated subtree), else on the v1
   hierarchies of the `memory` and `pids` controllers (plus `cpu` and
   `cpuacct` where mounted). Session cgroups are children of the worker's own
   cgroup on each hierarchy, so that whatever limits the worker itself lives
   under still apply. A probe cgroup is made and removed to prove it works.
2. `CgroupLayout.create(session_id, limits)` makes `enclave-<session_id>` in
   each place and writes the limits; the sandbox's first process joins it
   between fork and exec by writing to the files `join_files()` lists.
3. While the session runs, `cpu_seconds()` is polled; at the end
   `oom_kills()` says whether the kernel's OOM killer struck.
4. `kill()` kills every process in it, `remove()` deletes it. Both work on a
   `SessionCgroup` rebuilt from `record()` in another process.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from enclave.sessions.spec import Limits

logger = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
REQUIRED_CONTROLLERS = ("memory", "pids")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CGROUP_PREFIX = "enclave-"
CFS_PERIOD_US = 100_000
# Rounds of "read the member list, SIGKILL each" before giving up on a cgroup
# whose processes keep forking faster than they die (the pids limit makes
# that finite in practice).
KILL_ROUNDS = 200
REMOVE_WAIT_S = 5.0


class CgroupError(OSError):
    """A session cgroup could not be made, limited or removed."""


@dataclass(frozen=True)
class _Mount:
    root: str
    mountpoint: str
    fstype: str
    options: frozenset[str]


@dataclass(frozen=True)
class SessionCgroup:
    """The cgroup directories of one session, by controller."""

    version: int
    paths: dict[str, str]

    @property
    def directories(self) -> list[str]:
        return sorted(set(self.paths.values()))

    def record(self) -> dict:
        return {"version": self.version, "paths": dict(self.paths)}

    @classmethod
    def from_record(cls, record: dict, session_id: str) -> SessionCgroup | None:
        """Rebuild from `record()`; None when it does not name this session's cgroup.

        The record comes from a file of the state directory; checking that every
        path is a session directory on a cgroup mount keeps a damaged record
        from turning `kill` or `remove` against anything else.
        """
        try:
            version = int(record["version"])
            paths = {str(k): str(v) for k, v in dict(record["paths"]).items()}
        except (KeyError, TypeError, ValueError):
            return None
        mountpoints = [m.mountpoint for m in _cgroup_mounts()]
        for path in paths.values():
            if os.path.basename(path) != CGROUP_PREFIX + session_id:
                return None
            if not any(_is_under(path, mountpoint) for mountpoint in mountpoints):
                return None
        return cls(version=version, paths=paths)

    def exists(self) -> bool:
        return any(os.path.isdir(path) for path in self.directories)

    def join_files(self) -> list[str]:
        """The `cgroup.procs` files a process writes itself into to join."""
        return [os.path.join(path, "cgroup.procs") for path in self.directories]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.directories:
            try:
                text = Path(path, "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(line) for line in text.split())
        return found

    def cpu_seconds(self) -> float | None:
        """CPU time used by the session so far, None where nothing counts it."""
        try:
            if self.version == 2:
                stat = _read_keyed(Path(self.paths["cpu"], "cpu.stat"))
                return stat["usage_usec"] / 1e6
            if "cpuacct" in self.paths:
                usage = Path(self.paths["cpuacct"], "cpuacct.usage").read_text()
                return int(usage) / 1e9
        except (OSError, KeyError, ValueError):
            return None
        return None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup."""
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            return _read_keyed(Path(memory, name)).get("oom_kill", 0)
        except (OSError, ValueError):
            return 0

    def kill(self) -> None:
        """SIGKILL every process in the cgroup until none is left (or we give up)."""
        for path in self.directories:
            kill_file = Path(path, "cgroup.kill")
            if self.version == 2 and kill_file.exists():
                try:
                    kill_file.write_text("1")
                except OSError as exc:
                    logger.debug("cgroup.kill failed path=%s error=%s", path, exc)
        for _ in range(KILL_ROUNDS):
            members = self.pids()
            if not members:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        logger.warning("processes still in cgroup paths=%s", self.directories)

    def remove(self, wait_s: float = REMOVE_WAIT_S) -> bool:
        """Delete the cgroup directories; True when none is left.

        A directory cannot go while a killed process is still exiting (EBUSY),
        so this retries for a while.
        """
        deadline = time.monotonic() + wait_s
        remaining = [path for path in self.directories if os.path.isdir(path)]
        while remaining:
            still: list[str] = []
            for path in remaining:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        logger.warning(
                            "cannot remove cgroup path=%s error=%s", path, exc
                        )
                        return False
                    still.append(path)
            remaining = still
            if remaining:
                if time.monotonic() > deadline:
                    logger.warning("cgroup still busy paths=%s", remaining)
                    return False
                self.kill()
                time.sleep(0.02)
        return True


@dataclass(frozen=True)
class CgroupLayout:
    """Where this process can make session cgroups, and with which controllers."""

    version: int
    parents: dict[str, str] = field(default_factory=dict)

    @property
    def controllers(self) -> list[str]:
        return sorted(self.parents)

    def describe(self) -> str:
        return f"cgroup v{self.version} ({', '.join(self.controllers)})"

    def session_cgroup(self, session_id: str) -> SessionCgroup:
        name = CGROUP_PREFIX + session_id
        paths = {c: os.path.join(parent, name) for c, parent in self.parents.items()}
        return SessionCgroup(version=self.version, paths=paths)

    def create(
        self, session_id: str, limits: Limits, extra_pids: int = 0
    ) -> SessionCgroup:
        """Make the session's cgroup with its limits written; undone on failure."""
        cgroup = self.session_cgroup(session_id)
        if cgroup.exists():
            # Left by a worker that died mid-session: nothing may run in it.
            cgroup.kill()
            cgroup.remove()
        try:
            for path in cgroup.directories:
                os.mkdir(path, 0o755)
            _write_limits(cgroup, limits, extra_pids)
        except OSError as exc:
            cgroup.remove(wait_s=0)
            raise CgroupError(
                exc.errno, f"cannot set up the session cgroup: {exc}"
            ) from exc
        return cgroup


def detect(proc_self: str = "/proc/self") -> tuple[CgroupLayout | None, str]:
    """The usable cgroup layout, or None and the reason there is none."""
    try:
        mounts = _cgroup_mounts(Path(proc_self, "mountinfo"))
        memberships = _memberships(Path(proc_self, "cgroup"))
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"

    reasons = []
    for finder in (_v2_layout, _v1_layout):
        layout, reason = finder(mounts, memberships)
        if layout is None:
            reasons.append(reason)
            continue
        problem = _probe(layout)
        if problem is None:
            return layout, ""
        reasons.append(problem)
    return None, "; ".join(reasons)


def _v2_layout(
    mounts: list[_Mount], memberships: dict[str, str]
) -> tuple[CgroupLayout | None, str]:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    own = memberships.get("")
    if mount is None or own is None:
        return None, "no cgroup v2 mount"
    own_dir = _directory(mount, own)
    if own_dir is None:
        return None, "this process's cgroup v2 is outside the mount"

    # A cgroup holding processes cannot also hand controllers to children
    # (the "no internal processes" rule), so a worker started in a leaf of a
    # delegated subtree has to make its sessions beside itself.
    candidates = [own_dir]
    if os.path.normpath(own_dir) != os.path.normpath(mount.mountpoint):
        candidates.append(os.path.dirname(os.path.normpath(own_dir)))
    reasons = []
    for candidate in candidates:
        try:
            available = set(Path(candidate, "cgroup.controllers").read_text().split())
        except OSError as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        wanted = [c for c in V2_CONTROLLERS if c in available]
        missing = [c for c in REQUIRED_CONTROLLERS if c not in available]
        if missing:
            reasons.append(f"{candidate} lacks {', '.join(missing)}")
            continue
        problem = _enable_controllers(candidate, wanted)
        if problem:
            reasons.append(problem)
            continue
        return CgroupLayout(version=2, parents={c: candidate for c in wanted}), ""
    return None, "cgroup v2: " + "; ".join(reasons)


def _enable_controllers(directory: str, wanted: list[str]) -> str | None:
    control = Path(directory, "cgroup.subtree_control")
    try:
        enabled = set(control.read_text().split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            control.write_text(" ".join("+" + c for c in missing))
    except OSError as exc:
        return f"cannot enable controllers in {directory}: {exc.strerror or exc}"
    return None


def _v1_layout(
    mounts: list[_Mount], memberships: dict[str, str]
) -> tuple[CgroupLayout | None, str]:
    parents: dict[str, str] = {}
    for mount in mounts:
        if mount.fstype != "cgroup":
            continue
        for controller in V1_CONTROLLERS:
            if controller not in mount.options or controller in parents:
                continue
            own = _v1_membership(memberships, controller)
            directory = None if own is None else _directory(mount, own)
            if directory is not None and os.access(directory, os.W_OK):
                parents[controller] = directory
    missing = [c for c in REQUIRED_CONTROLLERS if c not in parents]
    if missing:
        return None, f"cgroup v1: no writable {', '.join(missing)} hierarchy"
    return CgroupLayout(version=1, parents=parents), ""


def _probe(layout: CgroupLayout) -> str | None:
    """Make and remove a throwaway cgroup; a problem's description, or None."""
    probe = layout.session_cgroup(f"probe-{os.getpid()}-{time.monotonic_ns()}")
    try:
        for path in probe.directories:
            os.mkdir(path, 0o755)
    except OSError as exc:
        return f"cgroup v{layout.version}: cannot make a cgroup: {exc.strerror or exc}"
    finally:
        probe.remove(wait_s=1)
    return None


def _write_limits(cgroup: SessionCgroup, limits: Limits, extra_pids: int) -> None:
    memory_bytes = str(int(limits.memory_mb) * 1024 * 1024)
    pids = str(int(limits.pids) + extra_pids)
    quota = str(max(1000, int(limits.cpus * CFS_PERIOD_US)))
    paths = cgroup.paths
    if cgroup.version == 2:
        Path(paths["memory"], "memory.max").write_text(memory_bytes)
        # Swap would let a session run past its memory limit, only slower.
        _write_optional(Path(paths["memory"], "memory.swap.max"), "0")
        # An OOM kill ends the whole session at once rather than leaving a
        # half-killed tree that goes on running.
        _write_optional(Path(paths["memory"], "memory.oom.group"), "1")
        Path(paths["pids"], "pids.max").write_text(pids)
        if "cpu" in paths:
            Path(paths["cpu"], "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        return

    Path(paths["memory"], "memory.limit_in_bytes").write_text(memory_bytes)
    # Only present with swap accounting; must not be below the memory limit.
    _write_optional(Path(paths["memory"], "memory.memsw.limit_in_bytes"), memory_bytes)
    Path(paths["pids"], "pids.max").write_text(pids)
    if "cpu" in paths:
        Path(paths["cpu"], "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        Path(paths["cpu"], "cpu.cfs_quota_us").write_text(quota)
        Path(paths["cpu"], "cpu.shares").write_text(
            str(max(2, int(1024 * limits.cpus)))
        )


def _write_optional(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        logger.debug("optional cgroup setting skipped path=%s error=%s", path, exc)


def _read_keyed(path: Path) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _cgroup_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[_Mount]:
    mounts = []
    for line in mountinfo.read_text().splitlines():
        # id parent dev root mountpoint options [optional...] - type source super
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            _Mount(
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                fstype=tail[0],
                options=frozenset(tail[2].split(",")),
            )
        )
    return mounts


def _memberships(cgroup_file: Path) -> dict[str, str]:
    """Controller list (as written, "" for v2) to this process's cgroup path."""
    memberships = {}
    for line in cgroup_file.read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            memberships[parts[1]] = parts[2]
    return memberships


def _v1_membership(memberships: dict[str, str], controller: str) -> str | None:
    for controllers, path in memberships.items():
        if controller in controllers.split(","):
            return path
    return None


def _directory(mount: _Mount, path: str) -> str | None:
    """Where cgroup `path` of a hierarchy appears under this mount, if it does."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    relative = path[len(root) :].lstrip("/")
    return os.path.join(mount.mountpoint, relative) if relative else mount.mountpoint


def _is_under(path: str, directory: str) -> bool:
    path, directory = os.path.normpath(path), os.path.normpath(directory)
    return path.startswith(directory.rstrip("/") + "/")


def _unescape(text: str) -> str:
    # mountinfo writes spaces, tabs, newlines and backslashes as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
