"""A stand-in kubelet: it plays a node's part for Pods on a private control plane.

The private control plane has no scheduler and no kubelet, so `StandInKubelet`
does their work through the real API and the real wire protocol:

- it registers a Node whose kubelet endpoint is its own HTTPS server on
  127.0.0.1, so that the API server's `pods/log` requests (the ones the
  backend makes) are proxied to it exactly as to a kubelet. It serves
  `/containerLogs/<namespace>/<pod>/<container>` with `follow` and
  `limitBytes` as a kubelet does;
- `play(session_id, Outcome(...))` waits for the session's Pod, binds it to
  the node through the `binding` subresource, and writes what a kubelet would
  write through the `status` subresource: the clone step done, the workload
  running, the launcher's framed output in the log, and then how it ended
  (exit code, `OOMKilled`, the Pod's `DeadlineExceeded`), with the
  termination message the launcher writes.

On a real cluster (`ExistingCluster`) nothing of this runs: the node's own
kubelet runs the code, and `play` only returns a handle whose `wait` does
nothing, so the same test reads the same outcome from real execution.
"""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import socketserver
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from enclave.backends import k8s_objects
from enclave.sandbox import launcher
from tests.servers import free_port

logger = logging.getLogger(__name__)

NODE_NAME = "enclave-test-node"
POD_WAIT_S = 30.0


@dataclass
class Outcome:
    """What the stand-in kubelet makes of a session, in the order a node would."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    signal: int | None = None
    # The workload container's terminated reason ("Completed", "Error",
    # "OOMKilled"); the Pod's reason for a deadline ("DeadlineExceeded").
    reason: str | None = None
    pod_reason: str | None = None
    # The clone step's exit code, when the Pod has one.
    clone_exit_code: int = 0
    # Raw log lines written after the frames, as a runtime's message would be.
    raw_log: bytes = b""
    # Set by the test to let the workload end; unset means at once.
    release: threading.Event | None = None
    # Keep the log stream open (as a running container's) for this long.
    run_s: float = 0.0


@dataclass
class Play:
    """A running stand-in for one session; `wait` returns when it is done."""

    thread: threading.Thread | None = None
    pod_name: str | None = None
    error: BaseException | None = None
    running: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 30.0) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "the stand-in kubelet did not finish"
        if self.error is not None:
            raise self.error


class _LogBuffer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.changed = threading.Condition()

    def write(self, data: bytes) -> None:
        with self.changed:
            self.data += data
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


class StandInKubelet:
    """A node and its kubelet's log endpoint, and the hand that writes Pod status."""

    def __init__(self, api: kubernetes.client.ApiClient, cert_file, key_file):
        self.api = api
        self.core = kubernetes.client.CoreV1Api(api)
        self.logs: dict[tuple[str, str, str], _LogBuffer] = {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.port = free_port()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_file), str(key_file))
        self._server = _Server(("127.0.0.1", self.port), _handler_for(self))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="stand-in-kubelet", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            },
        }
        try:
            _json(self.core.create_node(node, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise
            _json(
                self.core.patch_node_status(
                    NODE_NAME, {"status": node["status"]}, _preload_content=False
                )
            )

    def stop(self) -> None:
        for buffer in list(self.logs.values()):
            buffer.close()
        self._server.shutdown()
        self._server.server_close()

    def log(self, namespace: str, pod: str, container: str) -> _LogBuffer:
        with self._lock:
            return self.logs.setdefault((namespace, pod, container), _LogBuffer())

    # -- playing a session ------------------------------------------------------

    def play(self, namespace: str, session_id: str, outcome: Outcome) -> Play:
        play = Play()
        play.thread = threading.Thread(
            target=self._play,
            args=(namespace, session_id, outcome, play),
            name=f"stand-in-{session_id}",
            daemon=True,
        )
        play.thread.start()
        return play

    def _play(self, namespace, session_id, outcome: Outcome, play: Play) -> None:
        try:
            pod = self.wait_for_pod(namespace, session_id)
            name = pod["metadata"]["name"]
            play.pod_name = name
            self.bind(namespace, name)
            has_clone = bool(pod["spec"].get("initContainers"))
            if has_clone:
                self.set_status(
                    namespace,
                    name,
                    phase="Pending",
                    clone=_terminated(outcome.clone_exit_code, "Completed"),
                    workload=_waiting("PodInitializing"),
                )
                if outcome.clone_exit_code != 0:
                    self.set_status(
                        namespace,
                        name,
                        phase="Failed",
                        clone=_terminated(outcome.clone_exit_code, "Error"),
                        workload=_waiting("PodInitializing"),
                    )
                    return

            buffer = self.log(namespace, name, k8s_objects.WORKLOAD_CONTAINER)
            self.set_status(
                namespace,
                name,
                phase="Running",
                clone=_terminated(0, "Completed") if has_clone else None,
                workload={"running": {"startedAt": _now()}},
            )
            play.running.set()
            seq = 0
            for kind, data in (
                (launcher.STDOUT, outcome.stdout),
                (launcher.STDERR, outcome.stderr),
            ):
                for start in range(0, len(data), launcher.CHUNK_BYTES):
                    seq += 1
                    chunk = data[start : start + launcher.CHUNK_BYTES]
                    buffer.write(launcher.encode_frame(kind, seq, chunk))
            buffer.write(outcome.raw_log)
            if outcome.release is not None:
                outcome.release.wait(60)
            time.sleep(outcome.run_s)

            message = json.dumps(
                {"exit_code": outcome.exit_code, "signal": outcome.signal}
            )
            reason = outcome.reason or (
                "Completed" if outcome.exit_code == 0 else "Error"
            )
            phase = (
                "Succeeded"
                if outcome.exit_code == 0 and not outcome.pod_reason
                else "Failed"
            )
            try:
                self.set_status(
                    namespace,
                    name,
                    phase=phase,
                    reason=outcome.pod_reason,
                    clone=_terminated(0, "Completed") if has_clone else None,
                    workload=_terminated(outcome.exit_code, reason, message),
                )
            finally:
                buffer.close()
        except _PodGone:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the test by wait()
            play.error = exc

    def wait_for_pod(self, namespace: str, session_id: str) -> dict:
        selector = k8s_objects.session_selector(session_id)
        deadline = time.monotonic() + POD_WAIT_S
        while time.monotonic() < deadline:
            answer = _json(
                self.core.list_namespaced_pod(
                    namespace, label_selector=selector, _preload_content=False
                )
            )
            if answer["items"]:
                return answer["items"][0]
            time.sleep(0.05)
        raise AssertionError(f"no Pod of session {session_id} appeared")

    def bind(self, namespace: str, name: str) -> None:
        _drain(
            self.core.create_namespaced_pod_binding(
                name,
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
                },
                _preload_content=False,
            )
        )

    def set_status(
        self,
        namespace: str,
        name: str,
        *,
        phase: str,
        workload: dict,
        clone: dict | None = None,
        reason: str | None = None,
    ) -> None:
        """Write the Pod's status as a kubelet would, retrying on conflicts."""
        for _ in range(20):
            try:
                pod = _json(
                    self.core.read_namespaced_pod(
                        name, namespace, _preload_content=False
                    )
                )
            except ApiException as exc:
                if exc.status == 404:
                    raise _PodGone() from exc
                raise
            spec = pod["spec"]
            status = {
                "phase": phase,
                "hostIP": "127.0.0.1",
                "podIP": "10.244.0.10",
                "startTime": pod["status"].get("startTime") or _now(),
                "containerStatuses": [
                    _container_status(spec["containers"][0], workload)
                ],
            }
            if reason:
                status["reason"] = reason
                status["message"] = "Pod was active on the node longer than allowed"
            if clone is not None:
                status["initContainerStatuses"] = [
                    _container_status(spec["initContainers"][0], clone)
                ]
            pod["status"] = status
            try:
                _drain(
                    self.core.replace_namespaced_pod_status(
                        name, namespace, pod, _preload_content=False
                    )
                )
                return
            except ApiException as exc:
                if exc.status == 404:
                    raise _PodGone() from exc
                if exc.status != 409:
                    raise
        raise AssertionError(f"the status of {name} kept conflicting")


class _PodGone(Exception):
    """The Pod was deleted while being played: the backend ended it."""


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler_for(kubelet: StandInKubelet):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            logger.debug("stand-in kubelet: " + format, *args)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            query = dict(urllib.parse.parse_qsl(url.query))
            kubelet.requests.append({"path": url.path, "query": query})
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.send_error(404)
                return
            key = (parts[1], parts[2], parts[3])
            with kubelet._lock:
                buffer = kubelet.logs.get(key)
            if buffer is None:
                self.send_error(404, "container not found")
                return
            follow = query.get("follow") == "true"
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._stream(buffer, follow, limit)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                # The API server hung up: the reader went away.
                self.close_connection = True

        def _stream(self, buffer: _LogBuffer, follow: bool, limit: int | None):
            sent = 0
            while True:
                with buffer.changed:
                    while follow and sent >= len(buffer.data) and not buffer.closed:
                        buffer.changed.wait(1.0)
                    data = bytes(buffer.data[sent:])
                    closed = buffer.closed
                if limit is not None:
                    data = data[: max(0, limit - sent)]
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    sent += len(data)
                if not follow or closed or (limit is not None and sent >= limit):
                    return

    return Handler


def _container_status(container: dict, state: dict) -> dict:
    return {
        "name": container["name"],
        "state": state,
        "ready": "running" in state,
        "restartCount": 0,
        "image": container["image"],
        "imageID": "docker-pullable://" + container["image"],
        "containerID": "containerd://" + container["name"],
        "started": "running" in state,
    }


def _terminated(exit_code: int, reason: str, message: str | None = None) -> dict:
    state = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": _now(),
        "finishedAt": _now(),
    }
    if message:
        state["message"] = message
    return {"terminated": state}


def _waiting(reason: str) -> dict:
    return {"waiting": {"reason": reason}}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _drain(response) -> None:
    response.drain_conn()
    response.release_conn()


def _json(response) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()
