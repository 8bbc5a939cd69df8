"""The kubernetes backend: its objects, its launcher, and sessions against a kube-apiserver.

Three layers:

- the objects alone, checked by `kubernetes-validate --strict` and by the
  client's models (which refuse unknown fields), with an explicit assertion
  for every security field;
- the in-image launcher, on this host and in the sandbox image on Docker,
  since it is what keeps stdout and stderr apart in the logs API;
- the backend against a real kube-apiserver 1.20.2 that `tests/k8s/cluster.py`
  starts on 127.0.0.1 with etcd and the controller manager (CI builds them
  with tests/k8s/build-kubernetes.sh). The backend runs as the ServiceAccount
  of deploy/kubernetes under the Role granted there, through a plug
  (`tests/k8s/plug.py`) that can drop or silence its connections. With no
  kubelet, the stand-in of `tests/k8s/kubelet.py` binds the Pods, writes
  their status through the `status` subresource and serves their logs to the
  API server as a kubelet's endpoint would.

With `ENCLAVE_TEST_KUBECONFIG` the same tests run against a real cluster,
whose kubelets run the code itself; those that need to play the kubelet or
reach etcd fail there, saying so (see deploy/kubernetes/README.md).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import kubernetes.client
import kubernetes_validate
import pydantic
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from enclave.backends import k8s_objects
from enclave.backends.base import SessionBackend
from enclave.backends.k8s_objects import (
    EgressTarget,
    ObjectError,
    ProxyCredentials,
    SessionCredentials,
    build_session_objects,
)
from enclave.backends.kubernetes import (
    REQUIRED_PERMISSIONS,
    KubernetesBackend,
    pod_result,
)
from enclave.config import Settings
from enclave.sandbox import launcher
from enclave.sessions.spec import (
    EgressPolicy,
    GitSource,
    KillReason,
    LaunchSpec,
    Limits,
    Phase,
)
from tests.backends.recording import RecordingSink
from tests.k8s import manifests
from tests.k8s.cluster import ControlPlaneError, start_cluster
from tests.k8s.kubelet import Outcome, Play, StandInKubelet
from tests.k8s.plug import Plug

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = REPO_ROOT / "enclave" / "sandbox" / "launcher.py"
IMAGE = os.environ.get("ENCLAVE_SANDBOX_IMAGE", "enclave-sandbox:latest")
# The oldest schema kubernetes-validate ships; every field used here exists
# in 1.20 as well.
SCHEMA_VERSION = "1.25.0"
LIMITS = Limits(
    timeout_s=20,
    cpu_s=20,
    memory_mb=128,
    cpus=0.5,
    pids=64,
    output_bytes=64 * 1024,
    disk_mb=32,
)
GIT_TOKEN = "ghs_" + "T0KEN" * 8
WORKLOAD_PROXY = ProxyCredentials("ses_objects", "proxy-token-workload")
CLONE_PROXY = ProxyCredentials("ses_objects-clone", "proxy-token-clone")
CREDENTIALS = SessionCredentials(
    proxy=WORKLOAD_PROXY, clone_proxy=CLONE_PROXY, git_token=GIT_TOKEN
)
EGRESS = EgressTarget(
    namespace="enclave",
    host="10.96.0.10",
    port=8180,
    target_port="proxy",
    pod_labels={"app.kubernetes.io/component": "egress"},
)
MODELS = {
    "Pod": kubernetes.client.V1Pod,
    "ConfigMap": kubernetes.client.V1ConfigMap,
    "Secret": kubernetes.client.V1Secret,
    "NetworkPolicy": kubernetes.client.V1NetworkPolicy,
}
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _spec(session_id="ses_objects", code="print('hello')", **changes) -> LaunchSpec:
    limits = Limits.from_dict({**LIMITS.to_dict(), **changes.pop("limits", {})})
    return LaunchSpec(
        session_id=session_id,
        code=code,
        language=changes.pop("language", "python"),
        limits=limits,
        org_id=changes.pop("org_id", "org_test"),
        **changes,
    )


SPECS = {
    "python": _spec(),
    "node-with-stdin": _spec(language="node", code="console.log(1)", stdin="in\n"),
    "git-and-egress": _spec(
        source=GitSource("https://git.test/acme/app.git", "main"),
        egress=EgressPolicy(("api.test",)),
    ),
}


def _build(spec: LaunchSpec, **options) -> k8s_objects.SessionObjects:
    options.setdefault("namespace", "enclave-sessions")
    options.setdefault("image", IMAGE)
    options.setdefault("egress", EGRESS)
    options.setdefault("credentials", CREDENTIALS)
    return build_session_objects(spec, **options)


def _all(built: k8s_objects.SessionObjects) -> list[dict]:
    return [built.pod, *built.dependents()]


def _containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# -- the objects alone --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_build_session_objects_pass_strict_schemas_and_client_models(name):
    for obj in _all(_build(SPECS[name])):
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        MODELS[obj["kind"]].model_validate(obj)


def test_build_session_objects_pass_the_kubernetes_validate_command(tmp_path):
    documents = [obj for spec in SPECS.values() for obj in _all(_build(spec))]
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    command = Path(sys.executable).with_name("kubernetes-validate")

    completed = subprocess.run(
        [str(command), "--strict", "-k", SCHEMA_VERSION, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # A kind without a schema is only a warning to the command; here it fails.
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.count("INFO") == len(documents), completed.stdout
    assert "WARN" not in completed.stdout


def test_build_session_objects_checks_can_fail_on_a_misspelt_field():
    pod = _build(SPECS["python"]).pod
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, SCHEMA_VERSION, strict=True)
    with pytest.raises(pydantic.ValidationError):
        kubernetes.client.V1Pod.model_validate(pod)


def test_build_session_objects_lock_the_pod_down():
    spec = SPECS["git-and-egress"]
    pod = _build(spec, runtime_class="gvisor").pod
    pod_spec = pod["spec"]

    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["activeDeadlineSeconds"] == math.ceil(spec.limits.timeout_s)
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["enableServiceLinks"] is False
    assert pod_spec["runtimeClassName"] == "gvisor"
    assert "hostNetwork" not in pod_spec and "hostPID" not in pod_spec
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    expected_resources = {
        "cpu": "500m",
        "memory": "128Mi",
        "ephemeral-storage": f"{2 * 32 + k8s_objects.LOG_STORAGE_MB}Mi",
    }
    for container in _containers(pod):
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 1000
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["privileged"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"] == expected_resources
        assert container["resources"]["limits"] == expected_resources

    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    assert volumes["workspace"]["emptyDir"] == {"sizeLimit": "32Mi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "32Mi"}
    workload = pod_spec["containers"][0]
    mounts = {mount["mountPath"]: mount for mount in workload["volumeMounts"]}
    assert mounts["/workspace"]["name"] == "workspace"
    assert mounts["/tmp"]["name"] == "tmp"
    assert mounts[k8s_objects.INPUT_DIR]["readOnly"] is True

    assert "runtimeClassName" not in _build(spec).pod["spec"]


def test_build_session_objects_mount_the_token_on_the_init_container_alone():
    pod = _build(SPECS["git-and-egress"]).pod
    clone = pod["spec"]["initContainers"][0]
    workload = pod["spec"]["containers"][0]
    clone_volumes = {mount["name"] for mount in clone["volumeMounts"]}
    workload_volumes = {mount["name"] for mount in workload["volumeMounts"]}

    assert "git-credentials" in clone_volumes
    assert "git-credentials" not in workload_volumes
    # The checkout is all the two share.
    assert clone_volumes & workload_volumes == {"workspace"}
    token_file = f"{k8s_objects.GIT_CREDENTIALS_DIR}/{k8s_objects.GIT_TOKEN_KEY}"
    assert clone["command"][clone["command"].index("--token-file") + 1] == token_file
    secret_volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert secret_volume["name"] == "git-credentials"


def test_build_session_objects_keep_code_and_secrets_out_of_the_pod_spec():
    spec = _spec(
        code="print('CODE-MARKER')",
        stdin="STDIN-MARKER",
        source=GitSource("https://git.test/acme/app.git"),
        egress=EgressPolicy(("api.test",)),
    )
    built = _build(spec)
    pod_text = json.dumps(built.pod)

    for marker in ("CODE-MARKER", "STDIN-MARKER", GIT_TOKEN):
        assert marker not in pod_text
    assert built.config_map["data"] == {
        k8s_objects.CODE_KEY: spec.code,
        k8s_objects.STDIN_KEY: spec.stdin,
    }
    token = built.git_secret["data"][k8s_objects.GIT_TOKEN_KEY]
    assert base64.b64decode(token).decode() == GIT_TOKEN
    assert GIT_TOKEN not in json.dumps(built.config_map) + json.dumps(
        built.network_policy
    )
    assert GIT_TOKEN not in repr(CREDENTIALS)
    assert "proxy-token" not in repr(CREDENTIALS)

    # Each container has the proxy credentials meant for it and no others.
    clone, workload = _containers(built.pod)
    assert _env(workload)["HTTPS_PROXY"] == (
        "http://ses_objects:proxy-token-workload@10.96.0.10:8180"
    )
    assert _env(clone)["HTTPS_PROXY"] == (
        "http://ses_objects-clone:proxy-token-clone@10.96.0.10:8180"
    )
    assert "proxy-token-clone" not in json.dumps(workload)
    assert "proxy-token-workload" not in json.dumps(clone)


def test_build_session_objects_leave_proxy_settings_out_without_credentials():
    spec = SPECS["git-and-egress"]
    built = _build(spec, credentials=SessionCredentials(git_token=GIT_TOKEN))

    for container in _containers(built.pod):
        assert not {"HTTP_PROXY", "HTTPS_PROXY", "NODE_OPTIONS"} & set(_env(container))
    assert built.network_policy["spec"]["egress"] == []


def test_build_network_policy_admits_only_the_egress_proxy():
    built = _build(SPECS["git-and-egress"])
    policy = built.network_policy["spec"]

    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    assert policy["podSelector"]["matchLabels"] == {
        k8s_objects.LABEL_MANAGED: "true",
        k8s_objects.LABEL_SESSION: "ses_objects",
    }
    assert policy["egress"] == [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "enclave"}
                    },
                    "podSelector": {
                        "matchLabels": {"app.kubernetes.io/component": "egress"}
                    },
                }
            ],
            "ports": [{"protocol": "TCP", "port": "proxy"}],
        }
    ]
    # Without egress and without a clone step there is nowhere to go at all.
    assert _build(SPECS["python"]).network_policy["spec"]["egress"] == []


def test_build_session_objects_label_everything_with_session_and_org():
    spec = _spec(session_id="ses_labels", org_id="an org/with spaces")
    for obj in _all(_build(spec)):
        labels = obj["metadata"]["labels"]
        assert labels[k8s_objects.LABEL_SESSION] == "ses_labels"
        # Not a valid label value, so a stable digest stands in for it.
        assert labels[k8s_objects.LABEL_ORG] == k8s_objects.label_value(
            "an org/with spaces"
        )
        assert labels[k8s_objects.LABEL_ORG].startswith("h-")


def test_build_session_objects_refuse_code_a_config_map_cannot_hold():
    with pytest.raises(ObjectError, match="too large"):
        _build(_spec(code="x" * (k8s_objects.MAX_INPUT_BYTES + 1)))


def test_build_session_objects_need_the_proxy_address_for_proxy_credentials():
    with pytest.raises(ObjectError, match="egress proxy"):
        _build(SPECS["git-and-egress"], egress=None)


# -- reading a Pod's state ------------------------------------------------------------


def _pod_with(workload_state=None, pod_reason=None, phase="Running", clone=None):
    status: dict = {"phase": phase}
    if pod_reason:
        status["reason"] = pod_reason
    if workload_state is not None:
        status["containerStatuses"] = [{"name": "session", "state": workload_state}]
    if clone is not None:
        status["initContainerStatuses"] = [{"name": "clone", "state": clone}]
    return {"spec": {}, "status": status}


def _terminated(exit_code, reason="Error", message=None):
    state = {"exitCode": exit_code, "reason": reason}
    if message is not None:
        state["message"] = json.dumps(message)
    return {"terminated": state}


@pytest.mark.parametrize(
    ("pod", "phase", "kill_reason", "exit_code", "signal_number"),
    [
        (_pod_with({"running": {}}), None, None, None, None),
        (_pod_with(_terminated(0, "Completed")), Phase.SUCCEEDED, None, 0, None),
        (_pod_with(_terminated(3)), Phase.FAILED, None, 3, None),
        (
            _pod_with(_terminated(137, "OOMKilled", {"exit_code": 137, "signal": 9})),
            Phase.KILLED,
            KillReason.MEMORY,
            137,
            9,
        ),
        (
            _pod_with(_terminated(143), pod_reason="DeadlineExceeded"),
            Phase.KILLED,
            KillReason.TIMEOUT,
            143,
            None,
        ),
        (
            _pod_with(_terminated(152, message={"exit_code": 152, "signal": 24})),
            Phase.KILLED,
            KillReason.CPU,
            152,
            24,
        ),
        (
            _pod_with(_terminated(143, message={"exit_code": 143, "signal": 15})),
            Phase.FAILED,
            None,
            143,
            15,
        ),
    ],
    ids=["running", "exit-0", "exit-3", "oom", "deadline", "cpu", "sigterm"],
)
def test_pod_result_reads_exit_status_and_kill_reasons(
    pod, phase, kill_reason, exit_code, signal_number
):
    result = pod_result(pod)

    if phase is None:
        assert result is None
        return
    assert result.phase is phase
    assert result.kill_reason is kill_reason
    assert result.exit_code == exit_code
    assert result.signal == signal_number


def test_pod_result_reports_an_eviction_and_a_failed_clone():
    evicted = _pod_with(
        phase="Failed", pod_reason="Evicted", workload_state={"running": {}}
    )
    evicted["status"]["message"] = 'Usage of EmptyDir volume "workspace" exceeds'
    assert "evicted" in pod_result(evicted).error

    clone_failed = _pod_with(phase="Failed", clone=_terminated(20))
    clone_failed["spec"] = _build(SPECS["git-and-egress"]).pod["spec"]
    result = pod_result(clone_failed)
    assert result.phase is Phase.FAILED
    assert "repository not found" in result.error
    assert "https://git.test/acme/app.git" in result.error


# -- the launcher --------------------------------------------------------------------


def _input_dir(path: Path, code: str, stdin: str | None = None) -> Path:
    path.mkdir()
    (path / launcher.CODE_FILE).write_text(code)
    if stdin is not None:
        (path / launcher.STDIN_FILE).write_text(stdin)
    return path


def _split(log: bytes) -> tuple[bytes, bytes, list[int]]:
    streams = {launcher.STDOUT: b"", launcher.STDERR: b""}
    seqs = []
    for line in log.splitlines():
        frame = launcher.decode_frame(line)
        assert frame is not None, f"an unframed line in the log: {line!r}"
        if frame.kind != launcher.HEARTBEAT:
            streams[frame.kind] += frame.data
            seqs.append(frame.seq)
    return streams[launcher.STDOUT], streams[launcher.STDERR], seqs


def _run_launcher(tmp_path, code, stdin=None, cpu_s=10):
    inputs = _input_dir(tmp_path / "input", code, stdin)
    workdir = tmp_path / "work"
    workdir.mkdir()
    termination = tmp_path / "termination-log"
    completed = subprocess.run(
        [
            sys.executable,
            str(LAUNCHER),
            "--language",
            "python",
            "--input",
            str(inputs),
            "--cpu-s",
            str(cpu_s),
            "--termination-log",
            str(termination),
        ],
        cwd=workdir,
        check=False,
        capture_output=True,
        timeout=60,
    )
    return completed, json.loads(termination.read_text())


def test_launcher_keeps_stdout_and_stderr_apart(tmp_path):
    code = (
        "import sys\n"
        "for i in range(3):\n"
        "    print('out', i, flush=True)\n"
        "    print('err', i, file=sys.stderr, flush=True)\n"
        "print(sys.stdin.read().upper(), end='')\n"
        "sys.exit(3)\n"
    )
    completed, reported = _run_launcher(tmp_path, code, stdin="from stdin\n")
    stdout, stderr, seqs = _split(completed.stdout)

    assert stdout == b"out 0\nout 1\nout 2\nFROM STDIN\n"
    assert stderr == b"err 0\nerr 1\nerr 2\n"
    assert seqs == list(range(1, len(seqs) + 1))
    assert completed.stderr == b""
    assert completed.returncode == 3
    assert reported == {"exit_code": 3, "signal": None}


def test_launcher_reports_the_signal_that_ended_the_code(tmp_path):
    completed, reported = _run_launcher(tmp_path, "while True:\n    pass\n", cpu_s=1)

    assert reported == {"exit_code": 128 + signal.SIGXCPU, "signal": signal.SIGXCPU}
    assert completed.returncode == 128 + signal.SIGXCPU


def test_launcher_runs_the_pods_command_in_the_sandbox_image(tmp_path):
    try:
        client = docker.from_env()
        client.images.get(IMAGE)
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"the sandbox image {IMAGE} on a Docker engine is needed ({exc}); "
            "build it with enclave/sandbox/build-image.sh",
            pytrace=False,
        )
    in_image = client.containers.run(
        IMAGE,
        command=["cat", k8s_objects.LAUNCHER_COMMAND[-1]],
        network_mode="none",
        remove=True,
    )
    if in_image != LAUNCHER.read_bytes():
        pytest.fail(
            f"the launcher in {IMAGE} is not the one in {LAUNCHER}; rebuild "
            "the image with enclave/sandbox/build-image.sh",
            pytrace=False,
        )
    spec = _spec(
        code="import sys\nprint('to stdout')\nprint(input(), file=sys.stderr)\n",
        stdin="to stderr\n",
    )
    built = _build(spec)
    workload = built.pod["spec"]["containers"][0]
    inputs = tmp_path / "input"
    inputs.mkdir()
    for key, value in built.config_map["data"].items():
        (inputs / key).write_text(value)
    inputs.chmod(0o755)

    # The Pod's own command, environment and mounts, on the image's read-only
    # root as user 1000.
    container = client.containers.run(
        IMAGE,
        command=workload["command"] + workload["args"],
        environment=_env(workload),
        working_dir=workload["workingDir"],
        user="1000:1000",
        read_only=True,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/workspace": "uid=1000,gid=1000", "/tmp": ""},
        volumes={str(inputs): {"bind": k8s_objects.INPUT_DIR, "mode": "ro"}},
        detach=True,
    )
    try:
        status = container.wait(timeout=60)
        stdout, stderr, _ = _split(container.logs(stdout=True, stderr=False))
        launcher_errors = container.logs(stdout=False, stderr=True)
    finally:
        container.remove(force=True)

    assert launcher_errors == b""
    assert (stdout, stderr) == (b"to stdout\n", b"to stderr\n")
    assert status["StatusCode"] == 0


# -- against an API server: fixtures --------------------------------------------------


@pytest.fixture(scope="session")
def cluster():
    try:
        started = start_cluster()
    except (ControlPlaneError, OSError, subprocess.CalledProcessError) as exc:
        problem = f"no Kubernetes API server for the tests: {exc}"
    else:
        yield started
        started.stop()
        return
    pytest.fail(problem, pytrace=False)


@dataclass
class Env:
    """One module's namespaces, the backend's identity and the stand-ins."""

    cluster: object
    admin: kubernetes.client.ApiClient
    control: str
    sessions: str
    settings: Settings
    kubeconfig: Path
    kubelet: StandInKubelet | None
    plug: Plug | None

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.admin)

    def require_private(self) -> None:
        if self.kubelet is None:
            pytest.fail(
                "this test plays the kubelet or reaches etcd, which only the "
                "private control plane allows; deselect it on a real cluster",
                pytrace=False,
            )

    def play(self, session_id: str, outcome: Outcome) -> Play:
        if self.kubelet is None:
            return Play()
        return self.kubelet.play(self.sessions, session_id, outcome)

    def read(self, kind: str, name: str) -> dict | None:
        call = {
            "pod": self.core.read_namespaced_pod,
            "configmap": self.core.read_namespaced_config_map,
            "secret": self.core.read_namespaced_secret,
            "networkpolicy": kubernetes.client.NetworkingV1Api(
                self.admin
            ).read_namespaced_network_policy,
        }[kind]
        try:
            return _json(call(name, self.sessions, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def leftovers(self, session_id: str) -> list[str]:
        selector = k8s_objects.session_selector(session_id)
        networking = kubernetes.client.NetworkingV1Api(self.admin)
        found = []
        for kind, call in (
            ("pod", self.core.list_namespaced_pod),
            ("configmap", self.core.list_namespaced_config_map),
            ("secret", self.core.list_namespaced_secret),
            ("networkpolicy", networking.list_namespaced_network_policy),
        ):
            answer = _json(
                call(self.sessions, label_selector=selector, _preload_content=False)
            )
            found += [f"{kind}/{i['metadata']['name']}" for i in answer["items"]]
        return found

    def wait_for_pod(self, session_id: str, within_s: float = 30.0) -> dict:
        selector = k8s_objects.session_selector(session_id)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            answer = _json(
                self.core.list_namespaced_pod(
                    self.sessions, label_selector=selector, _preload_content=False
                )
            )
            if answer["items"]:
                return answer["items"][0]
            time.sleep(0.05)
        raise AssertionError(f"no Pod of {session_id} appeared")


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    suffix = secrets.token_hex(3)
    control, sessions = f"enclave-t{suffix}", f"enclave-sessions-t{suffix}"
    admin = cluster.admin_client()
    core = kubernetes.client.CoreV1Api(admin)
    workdir = tmp_path_factory.mktemp("k8s")
    documents = manifests.retarget(manifests.render(), control, sessions)
    _kubectl_apply(
        cluster,
        workdir / "identity.yaml",
        [
            d
            for d in documents
            if d["kind"] in ("Namespace", "ServiceAccount", "Role", "RoleBinding")
            or (d["kind"] == "Service" and d["metadata"]["name"] == "enclave-egress")
        ],
    )
    # Pods are admitted once their namespace's default ServiceAccount exists.
    _wait_for(
        lambda: _exists(core.read_namespaced_service_account, "default", sessions)
    )
    token = _json(
        core.create_namespaced_service_account_token(
            "enclave-backend",
            control,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600},
            },
            _preload_content=False,
        )
    )["status"]["token"]

    plug = kubelet = None
    if cluster.private:
        plug = Plug("127.0.0.1", cluster.port)
        kubelet = StandInKubelet(admin, cluster.ca_file, cluster.key_file)
        kubelet.start()
    kubeconfig = workdir / "backend.kubeconfig"
    kubeconfig.write_text(
        cluster.kubeconfig_for(token, server=plug.server if plug else None)
    )
    settings = Settings(
        backend="kubernetes",
        sandbox_image=IMAGE,
        kubernetes_kubeconfig=str(kubeconfig),
        kubernetes_namespace=sessions,
        kubernetes_egress_namespace=control,
        kubernetes_egress_service="enclave-egress",
        kubernetes_request_timeout_s=3.0,
        kubernetes_start_timeout_s=30.0 if cluster.private else 180.0,
        kubernetes_api_grace_s=3.0,
    )
    yield Env(
        cluster=cluster,
        admin=admin,
        control=control,
        sessions=sessions,
        settings=settings,
        kubeconfig=kubeconfig,
        kubelet=kubelet,
        plug=plug,
    )

    for namespace in (sessions, control):
        _ignore_missing(core.delete_namespace, namespace)
    if kubelet is not None:
        kubelet.stop()
    if plug is not None:
        plug.close()


@pytest.fixture
def backend(env) -> KubernetesBackend:
    return KubernetesBackend(env.settings)


@pytest.fixture
def session_id(env):
    """A fresh session id; the test fails if an object of it outlives the test."""
    value = f"ses_{secrets.token_hex(12)}"
    yield value
    if env.plug is not None:
        env.plug.restore()
    leftovers = env.leftovers(value)
    if leftovers:
        KubernetesBackend(env.settings).teardown(value)
    assert not leftovers, f"objects of {value} were left behind: {leftovers}"


def _json(response) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _done(response) -> None:
    """Read the rest of an answer, so that its connection can serve the next one."""
    response.drain_conn()
    response.release_conn()


def _exists(call, *args) -> bool:
    try:
        _done(call(*args, _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _ignore_missing(call, *args, **kwargs) -> None:
    try:
        _done(call(*args, _preload_content=False, **kwargs))
    except ApiException as exc:
        if exc.status != 404:
            raise


def _wait_for(condition, within_s: float = 30.0, message: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, message or "timed out waiting"
        time.sleep(0.1)


def _kubectl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [manifests.kubectl(), f"--kubeconfig={cluster.kubeconfig}", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert completed.returncode == 0, completed.stderr
    return completed


def _kubectl_apply(cluster, path: Path, documents: list[dict], *extra: str):
    path.write_text(yaml.safe_dump_all(documents))
    return _kubectl(cluster, "apply", "-f", str(path), *extra)


def _launch(backend, spec, credentials=None):
    sink = RecordingSink(output_bytes=spec.limits.output_bytes)
    thread = threading.Thread(
        target=backend.launch,
        args=(spec, sink),
        kwargs={"credentials": credentials},
        daemon=True,
    )
    thread.start()
    return sink, thread


def _finish(sink, thread, within_s: float = 60.0):
    thread.join(within_s)
    assert not thread.is_alive(), "launch did not return"
    assert sink.finished.is_set(), "launch returned without a result"
    return sink.result_value


def _wait_running(sink, within_s: float = 30.0) -> None:
    _wait_for(
        lambda: Phase.RUNNING in sink.phases or sink.finished.is_set(),
        within_s,
        "the session never started",
    )
    assert Phase.RUNNING in sink.phases, f"ended early: {sink.result_value}"


# -- against an API server ------------------------------------------------------------


def test_kubernetes_backend_implements_the_protocol(env):
    assert isinstance(KubernetesBackend(env.settings), SessionBackend)


def test_session_objects_pass_server_side_dry_run(env, backend):
    # As the worker's ServiceAccount: the dry run also shows the Role allows
    # creating each of them.
    api = kubernetes.client.ApiClient(_configuration(env.kubeconfig))
    core = kubernetes.client.CoreV1Api(api)
    networking = kubernetes.client.NetworkingV1Api(api)
    create = {
        "Pod": core.create_namespaced_pod,
        "ConfigMap": core.create_namespaced_config_map,
        "Secret": core.create_namespaced_secret,
        "NetworkPolicy": networking.create_namespaced_network_policy,
    }
    egress = backend._egress_target()
    for spec in SPECS.values():
        built = _build(
            spec,
            namespace=env.sessions,
            egress=egress,
            runtime_class=None,
        )
        for obj in _all(built):
            _done(
                create[obj["kind"]](
                    env.sessions, obj, dry_run="All", _preload_content=False
                )
            )

    # The server checks what the schemas cannot: here, a volume nobody defined.
    broken = _build(SPECS["python"], namespace=env.sessions, egress=egress).pod
    broken["spec"]["containers"][0]["volumeMounts"][0]["name"] = "undefined"
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(
            env.sessions, broken, dry_run="All", _preload_content=False
        )
    assert refused.value.status == 422
    assert env.leftovers("ses_objects") == []


def test_launch_creates_the_session_objects_and_keeps_the_token_to_the_clone_step(
    env, backend, session_id
):
    env.require_private()
    spec = _spec(
        session_id,
        source=GitSource("https://git.test/acme/app.git", "main"),
        egress=EgressPolicy(("api.test",)),
    )
    credentials = SessionCredentials(
        proxy=ProxyCredentials(session_id, "proxy-token"),
        clone_proxy=ProxyCredentials(f"{session_id}-clone", "clone-token"),
        git_token=GIT_TOKEN,
    )
    sink, thread = _launch(backend, spec, credentials)

    pod = env.wait_for_pod(session_id)
    name = pod["metadata"]["name"]
    _wait_for(
        lambda: all(
            (env.read(kind, n) or {}).get("metadata", {}).get("ownerReferences")
            for kind, n in (
                ("configmap", f"{name}-input"),
                ("secret", f"{name}-git"),
                ("networkpolicy", name),
            )
        ),
        message="the Pod never came to own its ConfigMap, Secret and NetworkPolicy",
    )
    pod = env.read("pod", name)
    pod_spec = pod["spec"]

    # No service-account token, by any route.
    assert pod_spec["automountServiceAccountToken"] is False
    for volume in pod_spec["volumes"]:
        assert "projected" not in volume
        assert volume.get("secret", {}).get("secretName") in (None, f"{name}-git")
    for container in _containers(pod):
        for mount in container["volumeMounts"]:
            assert not mount["mountPath"].startswith(SERVICE_ACCOUNT_MOUNT)
    # The token's Secret on the clone step only.
    clone, workload = _containers(pod)
    assert "git-credentials" in {m["name"] for m in clone["volumeMounts"]}
    assert "git-credentials" not in {m["name"] for m in workload["volumeMounts"]}
    secret = env.read("secret", f"{name}-git")
    assert base64.b64decode(secret["data"]["token"]).decode() == GIT_TOKEN
    assert GIT_TOKEN not in json.dumps(pod)

    service = _json(
        env.core.read_namespaced_service(
            "enclave-egress", env.control, _preload_content=False
        )
    )
    cluster_ip = service["spec"]["clusterIP"]
    assert _env(workload)["HTTP_PROXY"] == (
        f"http://{session_id}:proxy-token@{cluster_ip}:8180"
    )
    policy = env.read("networkpolicy", name)["spec"]
    assert policy["egress"][0]["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": env.control
    }
    assert policy["egress"][0]["ports"] == [{"protocol": "TCP", "port": "proxy"}]
    for kind, dependent in (
        ("configmap", f"{name}-input"),
        ("secret", f"{name}-git"),
        ("networkpolicy", name),
    ):
        obj = env.read(kind, dependent)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
        assert obj["metadata"]["labels"][k8s_objects.LABEL_ORG] == "org_test"

    backend.teardown(session_id)
    result = _finish(sink, thread)
    assert result.kill_reason is KillReason.TEARDOWN
    assert env.leftovers(session_id) == []


OUTCOMES = {
    "exit-zero": (
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n",
        {},
        Outcome(stdout=b"to stdout\n", stderr=b"to stderr\n"),
        (Phase.SUCCEEDED, None, 0),
    ),
    "exit-three": (
        "import sys\nsys.exit(3)\n",
        {},
        Outcome(exit_code=3),
        (Phase.FAILED, None, 3),
    ),
    "oom-killed": (
        "x = bytearray(1 << 30)\n",
        {"memory_mb": 64},
        Outcome(exit_code=137, signal=9, reason="OOMKilled"),
        (Phase.KILLED, KillReason.MEMORY, 137),
    ),
    "deadline-exceeded": (
        "import time\ntime.sleep(600)\n",
        {"timeout_s": 3},
        Outcome(exit_code=143, signal=15, pod_reason="DeadlineExceeded"),
        (Phase.KILLED, KillReason.TIMEOUT, None),
    ),
}


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_launch_turns_the_pod_status_into_the_result(env, backend, session_id, name):
    code, limits, outcome, (phase, kill_reason, exit_code) = OUTCOMES[name]
    spec = _spec(session_id, code=code, limits=limits)
    play = env.play(session_id, outcome)
    sink, thread = _launch(backend, spec)

    result = _finish(sink, thread, within_s=120)
    play.wait()

    assert sink.phases == [Phase.PROVISIONING, Phase.RUNNING]
    assert (result.phase, result.kill_reason) == (phase, kill_reason)
    if exit_code is not None:
        assert result.exit_code == exit_code
    if name == "exit-zero":
        assert sink.stdout_text == "to stdout\n"
        assert sink.stderr_text == "to stderr\n"
    assert result.duration_ms is not None
    assert env.leftovers(session_id) == []


def test_launch_streams_output_while_the_code_runs(env, backend, session_id):
    release = threading.Event()
    play = env.play(session_id, Outcome(stdout=b"first\n", release=release))
    code = "import time\nprint('first', flush=True)\ntime.sleep(4)\n"
    sink, thread = _launch(backend, _spec(session_id, code=code))

    _wait_for(lambda: "first" in sink.stdout_text, 60, "no output arrived")
    assert thread.is_alive(), "the output came only with the end"
    release.set()
    result = _finish(sink, thread)
    play.wait()

    assert result.phase is Phase.SUCCEEDED
    assert sink.stdout_text == "first\n"


def test_launch_enforces_the_output_cap(env, backend, session_id):
    cap = 10_000
    release = threading.Event()
    play = env.play(session_id, Outcome(stdout=b"x" * 200_000, release=release))
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 1000)\n"
    sink, thread = _launch(
        backend, _spec(session_id, code=code, limits={"output_bytes": cap})
    )

    result = _finish(sink, thread)
    release.set()
    play.wait()

    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.OUTPUT_LIMIT
    assert len(sink.stdout_text.encode()) == cap
    assert env.leftovers(session_id) == []


def test_launch_reports_a_failed_clone_step(env, backend, session_id):
    env.require_private()
    spec = _spec(session_id, source=GitSource("https://git.test/acme/gone.git"))
    play = env.play(session_id, Outcome(clone_exit_code=20))
    sink, thread = _launch(backend, spec, SessionCredentials(git_token=GIT_TOKEN))

    result = _finish(sink, thread)
    play.wait()

    assert Phase.RUNNING not in sink.phases
    assert result.phase is Phase.FAILED
    assert "repository not found" in result.error
    assert GIT_TOKEN not in result.error


def test_launch_watch_recovers_from_410_and_dropped_connections(
    env, backend, session_id, caplog
):
    env.require_private()
    caplog.set_level(logging.DEBUG, logger="enclave.backends.kubernetes")
    release = threading.Event()
    play = env.play(session_id, Outcome(stdout=b"before\n", release=release))
    sink, thread = _launch(backend, _spec(session_id))
    _wait_for(lambda: "before" in sink.stdout_text, 30, "no output arrived")

    # Writes elsewhere move etcd past the watch's version; compacting etcd
    # then makes that version unusable, and cutting the connections makes the
    # backend ask for it again.
    for index in range(3):
        _ignore_missing(
            env.core.create_namespaced_config_map,
            env.control,
            {"metadata": {"name": f"bump-{session_id[-6:]}-{index}"}},
        )
    env.cluster.compact_etcd()
    env.plug.drop()
    _wait_for(
        lambda: any("relisting" in r.getMessage() for r in caplog.records),
        30,
        "the watch never met a 410",
    )
    release.set()
    result = _finish(sink, thread)
    play.wait()

    assert result.phase is Phase.SUCCEEDED
    # The log was read again from its start, and nothing came twice.
    assert sink.stdout_text == "before\n"


def test_launch_ends_when_the_api_server_goes_silent(env, backend, session_id):
    env.require_private()
    release = threading.Event()
    play = env.play(session_id, Outcome(release=release))
    sink, thread = _launch(backend, _spec(session_id))
    _wait_running(sink)

    env.plug.blackhole()
    silenced = time.monotonic()
    try:
        result = _finish(sink, thread, within_s=90)
        took = time.monotonic() - silenced
    finally:
        env.plug.restore()

    assert result.phase is Phase.FAILED
    assert "unreachable" in result.error
    assert took < 60, f"the launch took {took:.0f}s to notice"
    KubernetesBackend(env.settings).teardown(session_id)
    release.set()
    play.wait()


def test_teardown_is_idempotent_and_ends_a_pod_stuck_terminating(
    env, backend, session_id
):
    env.require_private()
    release = threading.Event()
    play = env.play(session_id, Outcome(release=release))
    sink, thread = _launch(backend, _spec(session_id))
    _wait_running(sink)
    pod = env.wait_for_pod(session_id)
    name = pod["metadata"]["name"]

    # A graceful delete of a Pod on a node waits for the kubelet, which here
    # never answers: the Pod stays Terminating.
    _done(
        env.core.delete_namespaced_pod(
            name, env.sessions, grace_period_seconds=30, _preload_content=False
        )
    )
    time.sleep(1)
    stuck = env.read("pod", name)
    assert stuck is not None and stuck["metadata"].get("deletionTimestamp")

    # Another process's backend, as the web process or the reaper would be.
    other = KubernetesBackend(env.settings)
    other.teardown(session_id)
    assert env.read("pod", name) is None
    assert env.leftovers(session_id) == []
    result = _finish(sink, thread)
    assert result.kill_reason is KillReason.TEARDOWN

    other.teardown(session_id)
    other.teardown(f"ses_{secrets.token_hex(12)}")
    release.set()
    play.wait()


def test_teardown_in_the_launching_process_ends_the_session(env, backend, session_id):
    release = threading.Event()
    play = env.play(session_id, Outcome(release=release))
    code = "import time\ntime.sleep(600)\n"
    sink, thread = _launch(backend, _spec(session_id, code=code))
    _wait_running(sink, within_s=180)

    backend.teardown(session_id)
    result = _finish(sink, thread)

    assert result.phase is Phase.KILLED
    assert result.kill_reason is KillReason.TEARDOWN
    release.set()
    play.wait()


def test_deleting_the_pod_collects_its_secret_config_map_and_network_policy(
    env, backend, session_id
):
    spec = _spec(session_id, source=GitSource("https://git.test/acme/app.git"))
    built = build_session_objects(
        spec,
        namespace=env.sessions,
        image=IMAGE,
        credentials=SessionCredentials(git_token=GIT_TOKEN),
    )
    pod = backend._create(built)
    name = pod["metadata"]["name"]
    dependents = [
        ("configmap", f"{name}-input"),
        ("secret", f"{name}-git"),
        ("networkpolicy", name),
    ]
    for kind, dependent in dependents:
        assert env.read(kind, dependent) is not None

    # Deleted by hand, not by the backend: only the owner references can
    # take the rest with it.
    _done(
        env.core.delete_namespaced_pod(
            name, env.sessions, grace_period_seconds=0, _preload_content=False
        )
    )
    _wait_for(
        lambda: all(env.read(kind, d) is None for kind, d in dependents),
        60,
        "the garbage collector left the Pod's dependents",
    )
    assert env.leftovers(session_id) == []


def test_sweep_reclaims_only_sessions_no_longer_active(env, backend):
    active, stale = f"ses_{secrets.token_hex(12)}", f"ses_{secrets.token_hex(12)}"
    for session in (active, stale):
        backend._create(
            build_session_objects(_spec(session), namespace=env.sessions, image=IMAGE)
        )
    try:
        swept = backend.sweep([active])

        assert stale in swept and active not in swept
        _wait_for(lambda: env.leftovers(stale) == [], 30, "the sweep left objects")
        assert len(env.leftovers(active)) == 3
    finally:
        backend.teardown(active)
        backend.teardown(stale)
    assert env.leftovers(active) == []


def test_health_is_ok_under_the_manifests_role(env, backend):
    health = backend.health()

    assert health.ok, health.detail
    assert env.sessions in health.detail


def test_health_names_what_is_missing(env, tmp_path):
    core = env.core
    _done(
        core.create_namespaced_service_account(
            env.control,
            {"metadata": {"name": "nobody"}},
            _preload_content=False,
        )
    )
    token = _json(
        core.create_namespaced_service_account_token(
            "nobody",
            env.control,
            {"spec": {"expirationSeconds": 600}},
            _preload_content=False,
        )
    )["status"]["token"]
    kubeconfig = tmp_path / "nobody.kubeconfig"
    kubeconfig.write_text(env.cluster.kubeconfig_for(token))
    unprivileged = KubernetesBackend(
        env.settings.replace(kubernetes_kubeconfig=str(kubeconfig))
    )
    admin_config = tmp_path / "admin.kubeconfig"
    admin_config.write_text(Path(env.cluster.kubeconfig).read_text())
    no_namespace = KubernetesBackend(
        env.settings.replace(
            kubernetes_kubeconfig=str(admin_config),
            kubernetes_namespace=f"missing-{secrets.token_hex(3)}",
        )
    )
    closed = KubernetesBackend(
        env.settings.replace(
            kubernetes_kubeconfig=str(_unreachable_kubeconfig(env, tmp_path))
        )
    )

    denied = unprivileged.health()
    assert not denied.ok
    assert "create pods" in denied.detail and "get pods/log" in denied.detail
    missing = no_namespace.health()
    assert not missing.ok and "does not exist" in missing.detail
    started = time.monotonic()
    unreachable = closed.health()
    assert not unreachable.ok and "cannot be reached" in unreachable.detail
    assert time.monotonic() - started < 15


def test_manifests_role_grants_exactly_what_the_backend_uses():
    documents = manifests.render()
    granted = set()
    for role in (d for d in documents if d["kind"] == "Role"):
        scope = (
            "sessions"
            if role["metadata"]["namespace"] == "enclave-sessions"
            else "egress"
        )
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    resource, _, subresource = resource.partition("/")
                    for verb in rule["verbs"]:
                        granted.add(
                            (
                                verb,
                                resource,
                                group,
                                subresource,
                                scope,
                                bool(rule.get("resourceNames")),
                            )
                        )
    needed = {
        (p.verb, p.resource, p.group, p.subresource, p.scope, p.named)
        for p in REQUIRED_PERMISSIONS
    }

    assert granted == needed


def test_manifests_apply_with_server_side_dry_run(cluster, tmp_path):
    suffix = secrets.token_hex(3)
    control, sessions = f"enclave-m{suffix}", f"enclave-sessions-m{suffix}"
    documents = manifests.retarget(manifests.render(), control, sessions)
    for document in documents:
        kubernetes_validate.validate(document, SCHEMA_VERSION, strict=True)
    namespaces = [d for d in documents if d["kind"] == "Namespace"]
    rest = [d for d in documents if d["kind"] != "Namespace"]
    admin = kubernetes.client.CoreV1Api(cluster.admin_client())

    # A dry run creates nothing, so the namespaces the rest goes into must
    # exist for real.
    _kubectl_apply(cluster, tmp_path / "namespaces.yaml", namespaces)
    try:
        applied = _kubectl_apply(
            cluster, tmp_path / "rest.yaml", rest, "--dry-run=server"
        )
    finally:
        for namespace in (sessions, control):
            _ignore_missing(admin.delete_namespace, namespace)

    kinds = {d["kind"] for d in rest}
    assert {"Deployment", "Service", "Role", "NetworkPolicy", "ConfigMap"} <= kinds
    assert applied.stdout.count("(server dry run)") == len(rest), applied.stdout


# -- helpers --------------------------------------------------------------------------


def _configuration(kubeconfig: Path) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig),
        client_configuration=configuration,
        persist_config=False,
    )
    return configuration


def _unreachable_kubeconfig(env, tmp_path) -> Path:
    from tests.servers import free_port

    path = tmp_path / "closed.kubeconfig"
    path.write_text(
        env.cluster.kubeconfig_for(
            "no-token", server=f"https://127.0.0.1:{free_port()}"
        )
    )
    return path
