"""The `kubernetes` backend: one Pod per session on an existing cluster.

The objects themselves are built in `enclave.backends.k8s_objects`; this module
creates them, follows the session and tears it down, through the official
client, in `settings.kubernetes_namespace`.

Lifecycle of `launch`, which runs in an RQ worker and blocks until the end:

1. Build the session's objects. Create the NetworkPolicy first, so that the
   Pod never exists without it, then the ConfigMap holding code and stdin and,
   for a git source, the Secret holding the brokered token, then the Pod; and
   then make the Pod the owner of the others, so that deleting the Pod
   collects them. A crash in between leaves only labelled objects, which
   `sweep` reclaims.
2. Watch the Pod from the `resourceVersion` its creation returned. A watcher
   thread feeds every state it sees into the launch's queue; a 410 (the
   version is too old) relists the Pod and watches on from there, and a
   dropped connection resumes from the last version seen. Every request has a
   client-side timeout, so nothing waits on an API server that went away.
3. Once the workload container runs, report `running`, delete the git token's
   Secret (the clone step is over), and follow the container's log in a
   second thread. The log is the output of the in-image launcher
   (`enclave.sandbox.launcher`), which frames stdout and stderr apart and
   numbers the frames, so a reconnect that replays the log from its beginning
   delivers nothing twice. Output goes to the sink, and a refused chunk (the
   session's `output_bytes`) stops the session.
4. The launch ends when the Pod's state says the workload ended (exit status
   and signal from the launcher's termination message, `OOMKilled` as
   `memory`, `DeadlineExceeded` as `timeout`, SIGXCPU as `cpu`), when the Pod
   disappears (a teardown), when output is refused, when its own clock runs
   out, or when the API server has been unreachable for too long. Then every
   object of the session is deleted, and only then is `result` reported.

`teardown` deletes the session's objects by label with a grace period of 0,
which also ends Pods stuck in Terminating; deleting what is already gone is
no error, and any process of the deployment can call it. `sweep` deletes the
objects of every session not named as active, for whatever a crashed worker
left.

Secrets of a launch (proxy credentials, the git token) are not in a
`LaunchSpec`: they arrive through `launch(..., credentials=...)`, go into the
Pod's environment (proxy) or a Secret mounted on the clone step alone (token),
and never into a log line or an error message.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from enclave.backends import k8s_objects as objects
from enclave.backends.base import BackendEventSink, BackendHealth
from enclave.backends.k8s_objects import (
    LABEL_MANAGED,
    LABEL_SESSION,
    SessionCredentials,
)
from enclave.broker.clone import describe_clone_failure
from enclave.errors import BackendError, BackendUnavailable
from enclave.sandbox import launcher
from enclave.sessions.spec import (
    LANGUAGES,
    KillReason,
    LaunchSpec,
    Phase,
    SessionResult,
)

__all__ = ["KubernetesBackend", "SessionCredentials", "pod_result"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# A watch request ends on the server's side after this many request timeouts
# and is renewed; the client gives up on it one request timeout later, which
# bounds how long a silent API server goes unnoticed.
WATCH_WINDOW_REQUESTS = 3
# The launcher writes a heartbeat after five quiet seconds; a log stream that
# stays silent for four of them is taken for a dead connection.
LOG_READ_TIMEOUT_S = 4 * launcher.HEARTBEAT_S
LOG_CHUNK_BYTES = 64 * 1024
# Framing costs at most this many bytes of log per byte of output (a one-byte
# chunk becomes a line of about 18 bytes), so a log request limited to this
# multiple of `output_bytes` never cuts a session off before its own cap does.
LOG_BYTES_PER_OUTPUT_BYTE = 24
LOG_BYTES_ALLOWANCE = 1024 * 1024
# The kubelet's deadline normally ends a Pod first; the backend's own clock
# is the fallback for a node that does not.
DEADLINE_GRACE_S = 10.0
# After the workload ended: how long the log reader may take to deliver the rest.
DRAIN_GRACE_S = 10.0
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
EGRESS_CACHE_S = 60.0
# `health` backs every /healthz; the permission reviews (one request each) are
# redone only this often, since a Role seldom changes.
PERMISSIONS_CACHE_S = 300.0
# Start failures that retrying will not cure.
FATAL_WAITING_REASONS = frozenset(
    {
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
ERROR_DETAIL_CHARS = 300
METADATA_LIST = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"


@dataclass(frozen=True)
class Permission:
    """One thing the backend does through the API, for health and for the Role."""

    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    # "sessions": in `kubernetes_namespace`; "egress": in the proxy's namespace.
    scope: str = "sessions"
    # Set when the permission concerns one named object only.
    named: bool = False


REQUIRED_PERMISSIONS = (
    *(Permission(verb, "pods") for verb in ("create", "get", "list", "watch")),
    Permission("deletecollection", "pods"),
    Permission("get", "pods", subresource="log"),
    *(
        Permission(verb, "configmaps")
        for verb in ("create", "patch", "list", "deletecollection")
    ),
    *(
        Permission(verb, "secrets")
        for verb in ("create", "patch", "list", "delete", "deletecollection")
    ),
    *(
        Permission(verb, "networkpolicies", group="networking.k8s.io")
        for verb in ("create", "patch", "list", "deletecollection")
    ),
    Permission("get", "namespaces", named=True),
    Permission("get", "services", scope="egress", named=True),
)


# -- reading a Pod's state -------------------------------------------------------


def pod_result(pod: dict) -> SessionResult | None:
    """How the session ended, as far as the Pod's status tells; None while it runs.

    Durations are left to the caller, which measured them.
    """
    status = pod.get("status") or {}
    phase = status.get("phase")
    terminated = _state(
        _container_status(pod, objects.WORKLOAD_CONTAINER), "terminated"
    )
    exit_code, number = _exit_status(terminated) if terminated else (None, None)

    if status.get("reason") == "DeadlineExceeded":
        return SessionResult.killed(
            KillReason.TIMEOUT, exit_code=exit_code, signal=number
        )
    clone_failure = _clone_failure(pod)
    if clone_failure is not None:
        return SessionResult.failed(clone_failure)
    if status.get("reason") == "Evicted":
        return SessionResult.failed(
            "the Pod was evicted: " + _clip(status.get("message") or "no reason given")
        )
    if terminated:
        if terminated.get("reason") == "OOMKilled":
            return SessionResult.killed(
                KillReason.MEMORY, exit_code=exit_code, signal=number
            )
        if number == signal.SIGXCPU:
            return SessionResult.killed(
                KillReason.CPU, exit_code=exit_code, signal=number
            )
        if exit_code is None:
            return SessionResult.failed("the workload ended without an exit status")
        return SessionResult.exited(exit_code).replace(signal=number)
    if phase in ("Succeeded", "Failed"):
        reason = status.get("reason") or phase
        return SessionResult.failed(
            f"the Pod ended ({reason}) before the session's code ran"
        )
    return None


def start_failure(pod: dict) -> str | None:
    """Why the Pod can never start, when a container waits for good."""
    for init in (True, False):
        for container in _statuses(pod, init=init):
            waiting = _state(container, "waiting")
            if waiting and waiting.get("reason") in FATAL_WAITING_REASONS:
                return _clip(
                    f"the {container.get('name')} container cannot start: "
                    f"{waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(
                        ": "
                    )
                )
    return None


def workload_started(pod: dict) -> bool:
    workload = _container_status(pod, objects.WORKLOAD_CONTAINER)
    return bool(_state(workload, "running") or _state(workload, "terminated"))


def waiting_reason(pod: dict) -> str:
    """What the Pod waits for, for an error saying why it never started."""
    for init in (True, False):
        for container in _statuses(pod, init=init):
            waiting = _state(container, "waiting")
            if waiting and waiting.get("reason"):
                return f"{container.get('name')}: {waiting['reason']}"
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "False" and condition.get("reason"):
            return f"{condition.get('type')}: {condition['reason']}"
    return (pod.get("status") or {}).get("phase") or "not scheduled"


def _statuses(pod: dict, init: bool = False) -> list[dict]:
    key = "initContainerStatuses" if init else "containerStatuses"
    return (pod.get("status") or {}).get(key) or []


def _container_status(pod: dict, name: str, init: bool = False) -> dict | None:
    for container in _statuses(pod, init=init):
        if container.get("name") == name:
            return container
    return None


def _state(container: dict | None, which: str) -> dict | None:
    if not container:
        return None
    return (container.get("state") or {}).get(which)


def _exit_status(terminated: dict) -> tuple[int | None, int | None]:
    """Exit code and signal: the launcher's own account first, the kubelet's second."""
    reported = {}
    with contextlib.suppress(ValueError, TypeError):
        reported = json.loads(terminated.get("message") or "")
    if not isinstance(reported, dict):
        reported = {}
    code = reported.get("exit_code")
    number = reported.get("signal")
    if not isinstance(code, int):
        code = terminated.get("exitCode")
        number = terminated.get("signal") or None
    if not isinstance(number, int):
        number = None
    return code, number


def _clone_failure(pod: dict) -> str | None:
    clone = _container_status(pod, objects.CLONE_CONTAINER, init=True)
    terminated = _state(clone, "terminated")
    if not terminated or terminated.get("exitCode") == 0:
        return None
    if terminated.get("reason") == "OOMKilled":
        return "the clone step ran out of memory"

    # The clone step's exit code says what went wrong; its output is never
    # used, since it may quote what the git host said.
    options = _clone_options(pod)
    return describe_clone_failure(
        terminated.get("exitCode"),
        url=options.get("--url", "the repository"),
        ref=options.get("--ref"),
        timeout_s=float(options.get("--timeout-s", 0)),
        with_token="--token-file" in options,
    )


def _clone_options(pod: dict) -> dict[str, str]:
    """The clone step's `--option value` pairs, read back from its command."""
    for container in (pod.get("spec") or {}).get("initContainers") or []:
        if container.get("name") == objects.CLONE_CONTAINER:
            command = container.get("command") or []
            return {
                option: value
                for option, value in itertools.pairwise(command)
                if option.startswith("--")
            }
    return {}


def _clip(text: str) -> str:
    return text if len(text) <= ERROR_DETAIL_CHARS else text[:ERROR_DETAIL_CHARS] + "…"


# -- one launch -------------------------------------------------------------------

_WAKE = ("wake", None)


@dataclass
class _Run:
    """What a launch shares with its threads and with `teardown` in this process."""

    session_id: str
    events: queue.Queue = field(default_factory=queue.Queue)
    stop_reason: KillReason | None = None
    ended: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, reason: KillReason) -> None:
        with self.lock:
            # A session seen to end on its own keeps that account, whatever
            # arrives after it.
            if self.stop_reason is None and not self.ended:
                self.stop_reason = reason
        self.events.put(_WAKE)

    def end(self) -> KillReason | None:
        """Mark the workload as ended; the stop that came first, if any did."""
        with self.lock:
            self.ended = True
            return self.stop_reason


class KubernetesBackend:
    """Runs each session as a Pod in one namespace of a cluster."""

    name = "kubernetes"

    def __init__(self, settings) -> None:
        self.settings = settings
        self.namespace = settings.kubernetes_namespace
        self.image = settings.sandbox_image
        self.read_timeout_s = settings.kubernetes_request_timeout_s
        self.connect_timeout_s = min(CONNECT_TIMEOUT_S, self.read_timeout_s)
        self.watch_window_s = max(5, int(WATCH_WINDOW_REQUESTS * self.read_timeout_s))
        self._api: kubernetes.client.ApiClient | None = None
        self._client_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()
        self._egress: tuple[float, objects.EgressTarget] | None = None
        self._denied: tuple[float, list[str]] | None = None

    # -- the protocol -----------------------------------------------------------

    def launch(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        *,
        credentials: SessionCredentials | None = None,
    ) -> None:
        """Run the session; `credentials` carries its secrets, when it has any.

        The worker passes them here because a `LaunchSpec` holds nothing
        secret: the session's proxy credentials and, for a git source, the
        clone step's proxy credentials and the brokered token.
        """
        run = _Run(spec.session_id)
        with self._runs_lock:
            self._runs[spec.session_id] = run
        try:
            result = self._launch(spec, sink, run, credentials or SessionCredentials())
        finally:
            with self._runs_lock:
                if self._runs.get(spec.session_id) is run:
                    del self._runs[spec.session_id]

        sink.result(result)

    def teardown(self, session_id: str) -> None:
        with self._runs_lock:
            run = self._runs.get(session_id)
        if run is not None:
            run.stop(KillReason.TEARDOWN)

        # TODO: a teardown from another process that lands before `launch` has
        # created the Pod finds nothing, and the session then runs to its own
        # end; closing that gap needs a tombstone both sides can see.
        self._delete_session(objects.label_value(session_id))
        logger.info("session torn down session_id=%s backend=%s", session_id, self.name)

    def health(self) -> BackendHealth:
        try:
            version = self._call("reading the version", self._version().get_code)
            problems = []
            try:
                self._call(
                    "reading the namespace",
                    self._core().read_namespace,
                    self.namespace,
                )
            except BackendError as exc:
                # 403: the permission reviews below say what is missing.
                if _status(exc) not in (403, 404):
                    raise
                if _status(exc) == 404:
                    problems.append(f"the namespace {self.namespace} does not exist")
            denied = self._denied_permissions()
            if denied:
                problems.append("not allowed to " + ", ".join(denied))
            if not problems:
                try:
                    self._egress_target(fresh=True)
                except BackendError as exc:
                    problems.append(exc.message)
        except BackendError as exc:
            return BackendHealth(ok=False, detail=exc.message)

        server = (version or {}).get("gitVersion", "unknown")
        if problems:
            return BackendHealth(
                ok=False, detail=f"API server {server}: " + "; ".join(problems)
            )
        return BackendHealth(
            ok=True,
            detail=f"API server {server}, namespace {self.namespace}, "
            f"image {self.image}",
        )

    def sweep(self, active_session_ids: Iterable[str]) -> list[str]:
        """Delete the objects of every session not listed as active.

        Returns the session labels it swept. It lists metadata only, so the
        contents of Secrets and ConfigMaps never reach this process.
        """
        keep = {objects.label_value(session_id) for session_id in active_session_ids}
        found: set[str] = set()
        listings = {"pods": self._core().list_namespaced_pod}
        listings.update(self._dependent_calls("list"))
        for kind, call in listings.items():
            answer = self._call(
                f"listing {kind}",
                call,
                self.namespace,
                label_selector=f"{LABEL_MANAGED}=true",
                _headers={"Accept": METADATA_LIST},
            )
            for item in (answer or {}).get("items") or []:
                label = ((item.get("metadata") or {}).get("labels") or {}).get(
                    LABEL_SESSION
                )
                if label is not None:
                    found.add(label)

        stale = sorted(found - keep)
        for label in stale:
            self._delete_session(label)
        if stale:
            logger.info(
                "swept leftover sessions backend=%s count=%s", self.name, len(stale)
            )
        return stale

    # -- launching ----------------------------------------------------------------

    def _launch(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        run: _Run,
        credentials: SessionCredentials,
    ) -> SessionResult:
        sink.phase(Phase.PROVISIONING)
        if spec.language not in LANGUAGES:
            return SessionResult.failed(f"unsupported language {spec.language!r}")
        if spec.egress.allow and credentials.proxy is None:
            # TODO: the worker does not pass proxy credentials yet; until it
            # does, such a session runs with no network at all.
            logger.warning(
                "egress allow-list ignored, no proxy credentials session_id=%s "
                "backend=%s",
                spec.session_id,
                self.name,
            )

        try:
            needs_proxy = (spec.egress.allow and credentials.proxy) or (
                spec.source is not None and credentials.clone_proxy
            )
            built = objects.build_session_objects(
                spec,
                namespace=self.namespace,
                image=self.image,
                runtime_class=self.settings.kubernetes_runtime_class,
                egress=self._egress_target() if needs_proxy else None,
                credentials=credentials,
            )
        except objects.ObjectError as exc:
            return SessionResult.failed(str(exc))
        except BackendError as exc:
            return SessionResult.failed(exc.message)

        label = objects.label_value(spec.session_id)
        try:
            pod = self._create(built)
        except BackendError as exc:
            logger.warning(
                "session objects not created session_id=%s backend=%s error=%s",
                spec.session_id,
                self.name,
                exc.message,
            )
            self._delete_quietly(spec.session_id, label)
            if _status(exc) == 409:
                return SessionResult.failed(
                    "objects of this session already exist on the cluster"
                )
            return SessionResult.failed(exc.message)

        try:
            return self._follow(spec, sink, run, pod, built)
        finally:
            self._delete_quietly(spec.session_id, label)

    def _create(self, built: objects.SessionObjects) -> dict:
        for dependent in built.dependents():
            self._call_on(dependent, "create")
        pod = self._call(
            "creating the Pod",
            self._core().create_namespaced_pod,
            self.namespace,
            built.pod,
        )
        owner = {"metadata": {"ownerReferences": [objects.owner_reference(pod)]}}
        for dependent in built.dependents():
            try:
                self._call_on(dependent, "patch", owner)
            except BackendError as exc:
                # Unowned, they are still deleted by label when the launch
                # ends, or by a sweep.
                logger.warning(
                    "%s not owned by its Pod pod=%s error=%s",
                    dependent["kind"],
                    pod["metadata"]["name"],
                    exc.message,
                )
        return pod

    def _follow(
        self,
        spec: LaunchSpec,
        sink: BackendEventSink,
        run: _Run,
        pod: dict | None,
        built: objects.SessionObjects,
    ) -> SessionResult:
        name = pod["metadata"]["name"]
        watcher = _PodWatcher(self, name, pod["metadata"]["resourceVersion"], run)
        reader = _LogReader(self, name, sink, run, spec.limits.output_bytes)
        watcher.start()
        created = time.monotonic()
        start_deadline = created + self.settings.kubernetes_start_timeout_s
        if spec.source is not None:
            start_deadline += spec.limits.timeout_s
        started: float | None = None
        unreachable: BaseException | None = None

        try:
            while True:
                if pod is not None and started is None and workload_started(pod):
                    started = time.monotonic()
                    logger.info(
                        "session started session_id=%s org_id=%s backend=%s pod=%s",
                        spec.session_id,
                        spec.org_id,
                        self.name,
                        name,
                    )
                    sink.phase(Phase.RUNNING)
                    reader.start()
                    if built.git_secret is not None:
                        self._discard_token(built.git_secret)

                outcome = self._outcome(pod, run, reader, started)
                if outcome is not None:
                    return outcome

                now = time.monotonic()
                if started is not None:
                    deadline = started + spec.limits.timeout_s + DEADLINE_GRACE_S
                    if now >= deadline:
                        run.stop(KillReason.TIMEOUT)
                        continue
                elif now >= start_deadline:
                    return self._give_up(
                        spec,
                        run,
                        f"the Pod did not start within "
                        f"{int(start_deadline - created)}s "
                        f"({waiting_reason(pod) if pod else 'gone'})",
                    )
                elif pod is not None and start_failure(pod):
                    return self._give_up(spec, run, start_failure(pod))
                if unreachable is not None:
                    return self._give_up(
                        spec,
                        run,
                        "the Kubernetes API server was unreachable for "
                        f"{int(self.settings.kubernetes_api_grace_s)}s",
                        _elapsed_ms(started),
                    )

                wait = (deadline if started is not None else start_deadline) - now
                try:
                    kind, value = run.events.get(timeout=max(0.05, min(wait, 1.0)))
                except queue.Empty:
                    continue
                if kind == "pod":
                    pod = value
                elif kind == "gone":
                    pod = None
                elif kind == "unreachable":
                    unreachable = value
        finally:
            watcher.stop()
            reader.abandon()

    def _outcome(
        self,
        pod: dict | None,
        run: _Run,
        reader: _LogReader,
        started: float | None,
    ) -> SessionResult | None:
        """The result once the session is over, after its output is delivered."""
        result = pod_result(pod) if pod is not None else None
        reason = run.stop_reason
        if result is None and reason is None and pod is not None:
            return None

        reason = run.end()
        # Refused output ends a session whatever its Pod did next; any other
        # stop that meets a workload already over leaves its own account.
        if reason is not None and (result is None or reason is KillReason.OUTPUT_LIMIT):
            # The Pod goes first; the output it wrote so far has reached the
            # sink through the followed log, and nothing may follow the result.
            self._kill_quietly(run.session_id)
            reader.abandon()
            result = SessionResult.killed(reason)
        elif result is None:
            # The Pod vanished without our doing: a teardown elsewhere.
            reader.abandon()
            result = SessionResult.killed(KillReason.TEARDOWN)
        else:
            reader.finish(DRAIN_GRACE_S)
        return result.replace(duration_ms=_elapsed_ms(started))

    def _give_up(
        self,
        spec: LaunchSpec,
        run: _Run,
        error: str,
        duration_ms: int | None = None,
    ) -> SessionResult:
        logger.warning(
            "session abandoned session_id=%s backend=%s error=%s",
            spec.session_id,
            self.name,
            error,
        )
        run.end()
        self._kill_quietly(run.session_id)
        return SessionResult.failed(error, duration_ms=duration_ms)

    def _discard_token(self, secret: dict) -> None:
        """The clone step is over once the workload runs: the token goes now."""
        try:
            self._call(
                "deleting the git token",
                self._core().delete_namespaced_secret,
                secret["metadata"]["name"],
                self.namespace,
                grace_period_seconds=0,
                detail=False,
            )
        except BackendError as exc:
            if _status(exc) != 404:
                logger.warning("git token Secret not deleted error=%s", exc.message)

    # -- deleting -----------------------------------------------------------------

    def _delete_session(self, label: str) -> None:
        """Delete every object of the session; what is already gone is no error."""
        selector = f"{LABEL_MANAGED}=true,{LABEL_SESSION}={label}"
        calls = {"pods": self._core().delete_collection_namespaced_pod}
        calls.update(self._dependent_calls("delete_collection"))
        for kind, call in calls.items():
            options = {"grace_period_seconds": 0} if kind == "pods" else {}
            try:
                self._call(
                    f"deleting {kind}",
                    call,
                    self.namespace,
                    label_selector=selector,
                    # The answer lists what was deleted, Secrets included;
                    # it is never read.
                    discard=True,
                    **options,
                )
            except BackendError as exc:
                if _status(exc) != 404:
                    raise

    def _kill_quietly(self, session_id: str) -> None:
        try:
            self._delete_session(objects.label_value(session_id))
        except BackendError as exc:
            logger.warning(
                "session Pod not deleted session_id=%s backend=%s error=%s",
                session_id,
                self.name,
                exc.message,
            )

    def _delete_quietly(self, session_id: str, label: str) -> None:
        try:
            self._delete_session(label)
        except BackendError as exc:
            # The outcome stands; a teardown or a sweep reclaims the rest.
            logger.warning(
                "session objects not deleted session_id=%s backend=%s error=%s",
                session_id,
                self.name,
                exc.message,
            )

    # -- the API ------------------------------------------------------------------

    def _client(self) -> kubernetes.client.ApiClient:
        with self._client_lock:
            if self._api is None:
                self._api = _new_api_client(self.settings.kubernetes_kubeconfig)
            return self._api

    def _core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self._client())

    def _networking(self) -> kubernetes.client.NetworkingV1Api:
        return kubernetes.client.NetworkingV1Api(self._client())

    def _version(self) -> kubernetes.client.VersionApi:
        return kubernetes.client.VersionApi(self._client())

    def _dependent_calls(self, verb: str) -> dict:
        core, networking = self._core(), self._networking()
        return {
            "configmaps": getattr(core, f"{verb}_namespaced_config_map"),
            "secrets": getattr(core, f"{verb}_namespaced_secret"),
            "networkpolicies": getattr(networking, f"{verb}_namespaced_network_policy"),
        }

    def _call_on(self, obj: dict, verb: str, patch: dict | None = None) -> dict | None:
        kind = {"ConfigMap": "configmaps", "Secret": "secrets"}.get(
            obj["kind"], "networkpolicies"
        )
        call = self._dependent_calls(verb)[kind]
        # The answer to a write echoes the object; a Secret's is never read.
        secret = obj["kind"] == "Secret"
        if verb == "create":
            return self._call(
                f"creating the {obj['kind']}",
                call,
                self.namespace,
                obj,
                detail=not secret,
                discard=secret,
            )
        return self._call(
            f"updating the {obj['kind']}",
            call,
            obj["metadata"]["name"],
            self.namespace,
            patch,
            _content_type="application/merge-patch+json",
            detail=not secret,
            discard=True,
        )

    def _call(
        self,
        action: str,
        method,
        *args,
        detail: bool = True,
        discard: bool = False,
        **kwargs,
    ) -> dict | None:
        """Call the API with timeouts; the answer as a dictionary, unless discarded."""
        kwargs.setdefault(
            "_request_timeout", (self.connect_timeout_s, self.read_timeout_s)
        )
        with _api_errors(action, detail=detail):
            response = method(*args, _preload_content=False, **kwargs)
            try:
                if discard:
                    response.drain_conn()
                    body = None
                else:
                    body = response.data
            finally:
                response.release_conn()
        return json.loads(body) if body else None

    def _denied_permissions(self) -> list[str]:
        cached = self._denied
        if cached is not None and time.monotonic() - cached[0] < PERMISSIONS_CACHE_S:
            return cached[1]
        denied = [
            _describe(permission)
            for permission in REQUIRED_PERMISSIONS
            if not self._allowed(permission)
        ]
        # Only a clean bill is kept: a fix to the Role shows at the next probe.
        self._denied = (time.monotonic(), denied) if not denied else None
        return denied

    def _allowed(self, permission: Permission) -> bool:
        namespace = (
            self.namespace
            if permission.scope == "sessions"
            else self.settings.kubernetes_egress_namespace
        )
        attributes = {
            "namespace": namespace,
            "verb": permission.verb,
            "group": permission.group,
            "resource": permission.resource,
            "subresource": permission.subresource,
        }
        if permission.named:
            attributes["name"] = (
                namespace
                if permission.resource == "namespaces"
                else self.settings.kubernetes_egress_service
            )
        review = self._call(
            "reviewing permissions",
            kubernetes.client.AuthorizationV1Api(
                self._client()
            ).create_self_subject_access_review,
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes},
            },
        )
        return bool(((review or {}).get("status") or {}).get("allowed"))

    def _egress_target(self, fresh: bool = False) -> objects.EgressTarget:
        cached = self._egress
        if cached is not None and not fresh:
            at, target = cached
            if time.monotonic() - at < EGRESS_CACHE_S:
                return target

        namespace = self.settings.kubernetes_egress_namespace
        name = self.settings.kubernetes_egress_service
        try:
            service = self._call(
                "reading the egress proxy's Service",
                self._core().read_namespaced_service,
                name,
                namespace,
            )
        except BackendError as exc:
            if _status(exc) == 404:
                raise BackendError(
                    f"the egress proxy's Service {namespace}/{name} does not exist"
                ) from exc
            raise
        target = _egress_from_service(service, namespace, name)
        self._egress = (time.monotonic(), target)
        return target


def _egress_from_service(service: dict, namespace: str, name: str):
    spec = service.get("spec") or {}
    ports = spec.get("ports") or []
    if len(ports) > 1:
        ports = [port for port in ports if port.get("name") == "proxy"] or ports
    host = spec.get("clusterIP")
    selector = spec.get("selector") or {}
    if not ports or not host or host == "None" or not selector:
        raise BackendError(
            f"the egress proxy's Service {namespace}/{name} needs a cluster IP, "
            "a selector and a port (named `proxy` when there are several)"
        )
    port = ports[0]
    return objects.EgressTarget(
        namespace=namespace,
        host=host,
        port=int(port["port"]),
        target_port=port.get("targetPort") or int(port["port"]),
        pod_labels=dict(selector),
    )


def _new_api_client(kubeconfig: str | None) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            try:
                kubernetes.config.load_incluster_config(
                    client_configuration=configuration
                )
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(
                    client_configuration=configuration, persist_config=False
                )
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise BackendUnavailable(
            "no Kubernetes API server is configured (ENCLAVE_KUBERNETES_KUBECONFIG, "
            f"the in-cluster service account or ~/.kube/config): {exc}"
        ) from exc
    # Each call fails fast and says so; the callers decide whether to try again.
    configuration.retries = 0
    return kubernetes.client.ApiClient(configuration)


def _status(exc: BaseException) -> int | None:
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return cause.status if isinstance(cause, ApiException) else None


@contextlib.contextmanager
def _api_errors(action: str, detail: bool = True) -> Iterator[None]:
    """Turn the client's errors into the project's, keeping them as the cause.

    `detail=False` leaves the API server's message out, for requests whose
    object holds a secret.
    """
    try:
        yield
    except ApiException as exc:
        if exc.status in (0, 429) or (exc.status or 0) >= 500:
            raise BackendUnavailable(
                f"the Kubernetes API server failed while {action} ({exc.status})"
            ) from exc
        message = f"the Kubernetes API server refused {action}: {exc.status}"
        if detail:
            message += f" {_api_message(exc)}"
        raise BackendError(message.rstrip()) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise BackendUnavailable(
            f"the Kubernetes API server cannot be reached while {action}"
        ) from exc


def _api_message(exc: ApiException) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        body = json.loads(exc.body)
        if isinstance(body, dict) and body.get("message"):
            return _clip(str(body["message"]))
    return exc.reason or ""


def _describe(permission: Permission) -> str:
    resource = permission.resource
    if permission.subresource:
        resource += "/" + permission.subresource
    if permission.group:
        resource += "." + permission.group
    return f"{permission.verb} {resource}"


def _elapsed_ms(started: float | None) -> int | None:
    if started is None:
        return None
    return int((time.monotonic() - started) * 1000)


def _wait(event: threading.Event, backoff: float) -> float:
    event.wait(backoff)
    return min(backoff * 2, RETRY_MAX_S)


# -- the watcher and the log reader -------------------------------------------------


class _PodWatcher(threading.Thread):
    """Feeds every state of the Pod into the launch's queue until stopped.

    Queue items: ("pod", dict) for a new state, ("gone", None) when the Pod
    was deleted, ("unreachable", error) once the API server has failed every
    request for `kubernetes_api_grace_s`.
    """

    def __init__(self, backend: KubernetesBackend, name: str, version: str, run: _Run):
        super().__init__(name=f"enclave-watch-{run.session_id}", daemon=True)
        self._backend = backend
        self._pod = name
        self._version = version
        self._run = run
        self._stopped = threading.Event()
        self._response = None

    def stop(self) -> None:
        self._stopped.set()
        _shut(self._response)

    def run(self) -> None:
        backoff = RETRY_MIN_S
        failing_since: float | None = None
        grace = self._backend.settings.kubernetes_api_grace_s
        expired = False
        while not self._stopped.is_set():
            try:
                if expired:
                    logger.debug("watch expired, relisting pod=%s", self._pod)
                    self._relist()
                    expired, done = False, False
                else:
                    done = self._watch()
                if done:
                    return
                failing_since, backoff = None, RETRY_MIN_S
                continue
            except (ApiException, BackendError) as exc:
                status = exc.status if isinstance(exc, ApiException) else _status(exc)
                if status == 410:
                    # The version is compacted away: read the Pod as it is
                    # now and watch on from there.
                    expired = True
                    continue
                if status == 404:
                    self._run.events.put(("gone", None))
                    return
                problem: BaseException = exc
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                problem = exc

            if self._stopped.is_set():
                return
            logger.debug("watch interrupted pod=%s error=%r", self._pod, problem)
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since >= grace:
                self._run.events.put(("unreachable", problem))
                failing_since = now
            backoff = _wait(self._stopped, backoff)

    def _watch(self) -> bool:
        """One watch request; True when the Pod is gone."""
        backend = self._backend
        with _api_errors("watching the Pod"):
            response = backend._core().list_namespaced_pod(
                backend.namespace,
                field_selector=f"metadata.name={self._pod}",
                resource_version=self._version,
                allow_watch_bookmarks=True,
                watch=True,
                timeout_seconds=backend.watch_window_s,
                _preload_content=False,
                _request_timeout=(
                    backend.connect_timeout_s,
                    backend.watch_window_s + backend.read_timeout_s,
                ),
            )
        self._response = response
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiException(
                        status=obj.get("code"), reason=obj.get("message")
                    )
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._version = version
                if kind == "DELETED":
                    self._run.events.put(("gone", None))
                    return True
                if kind in ("ADDED", "MODIFIED"):
                    self._run.events.put(("pod", obj))
                if self._stopped.is_set():
                    return True
        finally:
            self._response = None
            response.close()
        return False

    def _relist(self) -> None:
        """Read the Pod afresh after a 410; a 404 raises like any refusal."""
        pod = self._backend._call(
            "reading the Pod",
            self._backend._core().read_namespaced_pod,
            self._pod,
            self._backend.namespace,
        )
        self._version = pod["metadata"]["resourceVersion"]
        self._run.events.put(("pod", pod))


class _LogReader(threading.Thread):
    """Follows the workload's log, splitting the launcher's frames into the sink.

    The logs API replays a log from its start on every request, so after a
    dropped connection the reader asks again and skips frames (by sequence
    number) and unframed lines (by position) it already delivered. Once the
    workload has ended, one last request without `follow` reads the rest.
    """

    def __init__(
        self,
        backend: KubernetesBackend,
        name: str,
        sink: BackendEventSink,
        run: _Run,
        output_bytes: int,
    ):
        super().__init__(name=f"enclave-logs-{run.session_id}", daemon=True)
        self._backend = backend
        self._pod = name
        self._sink = sink
        self._run = run
        self._limit_bytes = (
            LOG_BYTES_PER_OUTPUT_BYTE * output_bytes + LOG_BYTES_ALLOWANCE
        )
        self._final = threading.Event()
        self._abandoned = threading.Event()
        self._response = None
        self._delivered_seq = 0
        self._lines_done = 0
        self._decoders = {
            launcher.STDOUT: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            launcher.STDERR: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._refused = False
        self._silenced = False
        self._emit_lock = threading.Lock()

    def finish(self, timeout_s: float) -> None:
        """The workload ended: read what is left, then stop; bounded by `timeout_s`."""
        self._final.set()
        if self.is_alive():
            self.join(timeout_s)
        self.abandon()

    def abandon(self) -> None:
        """Stop reading; returns once no sink call is in progress, and none follows."""
        self._abandoned.set()
        self._final.set()
        _shut(self._response)
        with self._emit_lock:
            self._silenced = True

    def run(self) -> None:
        backoff = RETRY_MIN_S
        while not self._abandoned.is_set():
            final = self._final.is_set()
            try:
                self._read(follow=not final)
            except (BackendError, urllib3.exceptions.HTTPError, OSError) as exc:
                if self._abandoned.is_set():
                    break
                logger.debug("log stream interrupted pod=%s error=%r", self._pod, exc)
                backoff = _wait(self._abandoned, backoff)
                continue
            if final:
                break
            # The stream ended while the workload may still run: a dropped
            # connection, or the end the watcher has yet to report.
            self._final.wait(RETRY_MIN_S)
        for kind, decoder in self._decoders.items():
            self._emit(kind, decoder.decode(b"", final=True))

    def _read(self, follow: bool) -> None:
        backend = self._backend
        with _api_errors("reading the session's output"):
            response = backend._core().read_namespaced_pod_log(
                self._pod,
                backend.namespace,
                container=objects.WORKLOAD_CONTAINER,
                follow=follow,
                limit_bytes=self._limit_bytes,
                _preload_content=False,
                _request_timeout=(backend.connect_timeout_s, LOG_READ_TIMEOUT_S),
            )
        self._response = response
        index = 0
        received = 0
        pending = b""
        try:
            for chunk in response.stream(LOG_CHUNK_BYTES):
                received += len(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line, index)
                    index += 1
                if self._abandoned.is_set():
                    return
        finally:
            self._response = None
            response.close()
        if pending and not follow:
            # A last line without its newline: the launcher died mid-frame,
            # or something else wrote to the log.
            self._line(pending, index)
            index += 1
        self._lines_done = max(self._lines_done, index)
        if received >= self._limit_bytes:
            self._run.stop(KillReason.OUTPUT_LIMIT)

    def _line(self, line: bytes, index: int) -> None:
        frame = launcher.decode_frame(line)
        if frame is None:
            # Not the launcher's: its own crash, or the runtime's message.
            if index >= self._lines_done:
                self._emit(launcher.STDERR, line.decode(errors="replace") + "\n")
            return
        if frame.kind == launcher.HEARTBEAT or frame.seq <= self._delivered_seq:
            return
        self._delivered_seq = frame.seq
        self._emit(frame.kind, self._decoders[frame.kind].decode(frame.data))

    def _emit(self, kind: str, text: str) -> None:
        with self._emit_lock:
            if not text or self._refused or self._silenced:
                return
            if kind == launcher.STDOUT:
                accepted = self._sink.stdout(text)
            else:
                accepted = self._sink.stderr(text)
            if not accepted:
                self._refused = True
        if not accepted:
            self._run.stop(KillReason.OUTPUT_LIMIT)


def _lines(response) -> Iterator[bytes]:
    pending = b""
    for chunk in response.stream(LOG_CHUNK_BYTES):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _shut(response) -> None:
    """Unblock a thread reading `response`; harmless when it already ended."""
    if response is None:
        return
    with contextlib.suppress(Exception):
        # Whatever state the connection is in, closing it is all that is
        # wanted; a failure here only means it was closed already.
        response.shutdown()
