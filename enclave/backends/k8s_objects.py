"""The Kubernetes objects of one session, built as plain API dictionaries.

`build_session_objects` turns a `LaunchSpec` into what the `kubernetes` backend
creates for it, and nothing here talks to an API server, so every field can be
checked without one:

- a Pod: `restartPolicy: Never`, `activeDeadlineSeconds` from `timeout_s`, no
  service-account token, no service links, an optional runtime class, one
  workload container that is non-root, read-only, without privilege
  escalation or capabilities and under seccomp `RuntimeDefault`, with requests
  equal to limits from the session's limits and size-limited `emptyDir`
  volumes for the working directory and `/tmp`;
- a ConfigMap holding the code and stdin, mounted read-only as files, so that
  neither ever appears in the Pod's spec;
- for a git source, an init container that runs the clone step, and a Secret
  holding the brokered token that is mounted on that init container alone;
  the init container and the workload share only the checkout volume;
- a NetworkPolicy denying all ingress and allowing egress only to the egress
  proxy's pods on the proxy's port, and nothing else (not even DNS).

Every object carries the session and organisation labels; the backend makes
the Pod the owner of the others once it exists, so that deleting the Pod
collects them.

Secrets a launch needs (the proxy credentials, the git token) are not part of
a `LaunchSpec`; they come in as `SessionCredentials`, whose fields never show
in a repr.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from enclave.backends.docker import SANDBOX_ENVIRONMENT as DOCKER_ENVIRONMENT
from enclave.broker.clone import PROGRAM_DIR, SANDBOX_PYTHON, TOKEN_FILE_NAME, CloneStep
from enclave.egress.sandbox import NO_PROXY, NODE_PRELOAD_FILE
from enclave.sessions.spec import LaunchSpec

LABEL_MANAGED = "enclave.managed"
LABEL_SESSION = "enclave.session_id"
LABEL_ORG = "enclave.org_id"
LABEL_LANGUAGE = "enclave.language"
# Set on namespaces by Kubernetes 1.21 and later; the manifests under
# deploy/kubernetes set it themselves, so that 1.20 selects the same way.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

WORKLOAD_CONTAINER = "session"
CLONE_CONTAINER = "clone"

SANDBOX_UID = 1000
WORKDIR = "/workspace"
INPUT_DIR = "/var/run/enclave/input"
GIT_CREDENTIALS_DIR = "/var/run/enclave/git"
GIT_TOKEN_KEY = TOKEN_FILE_NAME
CODE_KEY = "code"
STDIN_KEY = "stdin"
TERMINATION_LOG = "/dev/termination-log"

# Programs baked into the sandbox image by enclave/sandbox/build-image.sh, from
# enclave/sandbox/, in the directory where the other backends mount them: the
# launcher that frames output, the clone step with the GIT_ASKPASS helper that
# reads the token from its file (never from an argument or a variable), and
# the preload that sends Node's requests through the proxy.
LAUNCHER_COMMAND = (SANDBOX_PYTHON, "-I", "-S", f"{PROGRAM_DIR}/launcher.py")
NODE_PRELOAD = f"{PROGRAM_DIR}/{NODE_PRELOAD_FILE}"

IMAGE_PULL_POLICY = "IfNotPresent"
# The kubelet's SIGTERM reaches the launcher, which passes it on; the code
# gets this long before SIGKILL when the deadline runs out.
TERMINATION_GRACE_S = 2
# A ConfigMap holds at most 1 MiB; the keys and the object's own fields take
# a little of it.
MAX_INPUT_BYTES = 1024 * 1024 - 8 * 1024
# The container's own log files count against its ephemeral storage beside the
# two volumes; the kubelet rotates them, so a fixed allowance covers them.
LOG_STORAGE_MB = 64

# The docker backend's, so that code sees the same environment on each.
SANDBOX_ENVIRONMENT = dict(DOCKER_ENVIRONMENT)
CLONE_ENVIRONMENT = {
    "PATH": SANDBOX_ENVIRONMENT["PATH"],
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")


class ObjectError(ValueError):
    """The session cannot be expressed as Kubernetes objects; safe to show."""


@dataclass(frozen=True)
class ProxyCredentials:
    """What the egress proxy knows a session (or its clone step) by."""

    username: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class SessionCredentials:
    """The secrets of one launch, which a `LaunchSpec` never carries.

    `proxy` goes to the workload as `HTTP(S)_PROXY`, `clone_proxy` to the
    clone step the same way, and `git_token` into a Secret mounted on the
    clone step alone. Any of them may be missing: without `proxy` the
    workload gets no proxy settings, and the egress proxy is reachable from
    the Pod only when one of its containers holds credentials for it.
    """

    proxy: ProxyCredentials | None = None
    clone_proxy: ProxyCredentials | None = None
    git_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class EgressTarget:
    """Where the egress proxy listens, as its Service describes it.

    `host` is the Service's cluster IP: sessions get no DNS, so the proxy's
    address cannot be a name. `target_port` is the port (number or name) on
    the proxy's pods, which is what a NetworkPolicy matches, and `pod_labels`
    the Service's selector.
    """

    namespace: str
    host: str
    port: int
    target_port: int | str
    pod_labels: dict[str, str]

    def url(self, credentials: ProxyCredentials) -> str:
        user = quote(credentials.username, safe="")
        token = quote(credentials.token, safe="")
        return f"http://{user}:{token}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SessionObjects:
    pod: dict
    config_map: dict
    network_policy: dict
    git_secret: dict | None = None

    def dependents(self) -> list[dict]:
        """The objects the Pod owns, in the order they are created."""
        found = [self.network_policy, self.config_map]
        if self.git_secret is not None:
            found.append(self.git_secret)
        return found


def label_value(raw: str) -> str:
    """`raw` itself when it is a valid label value, else a stable digest of it."""
    if len(raw) <= 63 and _LABEL_VALUE.match(raw):
        return raw
    return "h-" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def session_selector(session_id: str) -> str:
    return f"{LABEL_MANAGED}=true,{LABEL_SESSION}={label_value(session_id)}"


def pod_name(session_id: str) -> str:
    """A DNS-label name unique to the session: a readable part and a digest."""
    readable = _NAME_UNSAFE.sub("-", session_id.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:8]
    return f"enclave-{readable}-{digest}" if readable else f"enclave-{digest}"


def session_labels(spec: LaunchSpec) -> dict[str, str]:
    return {
        LABEL_MANAGED: "true",
        LABEL_SESSION: label_value(spec.session_id),
        LABEL_ORG: label_value(spec.org_id),
        LABEL_LANGUAGE: label_value(spec.language),
    }


def owner_reference(pod: dict) -> dict:
    """A reference that makes the Pod (as the API server returned it) the owner."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod["metadata"]["name"],
        "uid": pod["metadata"]["uid"],
        "controller": True,
    }


def build_session_objects(
    spec: LaunchSpec,
    *,
    namespace: str,
    image: str,
    runtime_class: str | None = None,
    egress: EgressTarget | None = None,
    credentials: SessionCredentials | None = None,
) -> SessionObjects:
    """Every object of the session; raises `ObjectError` for what cannot be built."""
    credentials = credentials or SessionCredentials()
    name = pod_name(spec.session_id)
    labels = session_labels(spec)
    input_bytes = len(spec.code.encode()) + len((spec.stdin or "").encode())
    if input_bytes > MAX_INPUT_BYTES:
        raise ObjectError(
            "the code and stdin together are too large for this backend "
            f"({input_bytes} bytes, at most {MAX_INPUT_BYTES})"
        )

    workload_proxy = credentials.proxy if spec.egress.allow else None
    clone_proxy = credentials.clone_proxy if spec.source is not None else None
    if (workload_proxy or clone_proxy) and egress is None:
        raise ObjectError("the egress proxy's address is unknown")

    config_map = _config_map(spec, f"{name}-input", namespace, labels)
    git_secret = None
    if spec.source is not None and credentials.git_token:
        git_secret = _git_secret(
            f"{name}-git", namespace, labels, credentials.git_token
        )
    pod = _pod(
        spec,
        name=name,
        namespace=namespace,
        labels=labels,
        image=image,
        runtime_class=runtime_class,
        config_map=config_map["metadata"]["name"],
        git_secret=git_secret["metadata"]["name"] if git_secret else None,
        workload_proxy=egress.url(workload_proxy) if workload_proxy else None,
        clone_proxy=egress.url(clone_proxy) if clone_proxy else None,
    )
    network_policy = _network_policy(
        name,
        namespace,
        labels,
        egress if (workload_proxy or clone_proxy) else None,
    )

    return SessionObjects(
        pod=pod,
        config_map=config_map,
        network_policy=network_policy,
        git_secret=git_secret,
    )


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(labels)}


def _config_map(spec: LaunchSpec, name: str, namespace: str, labels) -> dict:
    data = {CODE_KEY: spec.code}
    if spec.stdin is not None:
        data[STDIN_KEY] = spec.stdin
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, labels),
        "immutable": True,
        "data": data,
    }


def _git_secret(name: str, namespace: str, labels, token: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, namespace, labels),
        "type": "Opaque",
        "immutable": True,
        "data": {GIT_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def _network_policy(
    name: str,
    namespace: str,
    labels,
    egress: EgressTarget | None,
) -> dict:
    # No ingress rule admits nothing; egress is either nothing at all or the
    # proxy's pods on the proxy's port, with no exception for DNS.
    rules = []
    if egress is not None:
        rules.append(
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {NAMESPACE_NAME_LABEL: egress.namespace}
                        },
                        "podSelector": {"matchLabels": dict(egress.pod_labels)},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": egress.target_port}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, namespace, labels),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    LABEL_MANAGED: "true",
                    LABEL_SESSION: labels[LABEL_SESSION],
                }
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": rules,
        },
    }


def _pod(
    spec: LaunchSpec,
    *,
    name: str,
    namespace: str,
    labels: dict[str, str],
    image: str,
    runtime_class: str | None,
    config_map: str,
    git_secret: str | None,
    workload_proxy: str | None,
    clone_proxy: str | None,
) -> dict:
    limits = spec.limits
    disk = f"{max(1, int(limits.disk_mb))}Mi"
    resources = _resources(spec)
    volumes = [
        {"name": "workspace", "emptyDir": {"sizeLimit": disk}},
        {"name": "tmp", "emptyDir": {"sizeLimit": disk}},
        {
            "name": "input",
            "configMap": {"name": config_map, "defaultMode": 0o444},
        },
    ]
    workload = {
        "name": WORKLOAD_CONTAINER,
        "image": image,
        "imagePullPolicy": IMAGE_PULL_POLICY,
        "command": list(LAUNCHER_COMMAND),
        "args": [
            "--language",
            spec.language,
            "--input",
            INPUT_DIR,
            "--cpu-s",
            str(max(1, math.ceil(limits.cpu_s))),
        ],
        "workingDir": WORKDIR,
        "env": _environment(SANDBOX_ENVIRONMENT, workload_proxy),
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "input", "mountPath": INPUT_DIR, "readOnly": True},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }

    init_containers = []
    if spec.source is not None:
        volumes.append({"name": "clone-tmp", "emptyDir": {"sizeLimit": disk}})
        clone_mounts = [
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "clone-tmp", "mountPath": "/tmp"},
        ]
        clone = CloneStep(
            url=spec.source.url,
            ref=spec.source.ref,
            dest=WORKDIR,
            timeout_s=limits.timeout_s,
            token_file=(
                f"{GIT_CREDENTIALS_DIR}/{GIT_TOKEN_KEY}" if git_secret else None
            ),
        )
        if git_secret is not None:
            volumes.append(
                {
                    "name": "git-credentials",
                    # Group-readable: fsGroup makes the file the sandbox
                    # group's, and the clone step runs in that group.
                    "secret": {"secretName": git_secret, "defaultMode": 0o440},
                }
            )
            clone_mounts.append(
                {
                    "name": "git-credentials",
                    "mountPath": GIT_CREDENTIALS_DIR,
                    "readOnly": True,
                }
            )
        init_containers.append(
            {
                "name": CLONE_CONTAINER,
                "image": image,
                "imagePullPolicy": IMAGE_PULL_POLICY,
                "command": clone.argv(),
                "workingDir": "/tmp",
                "env": _environment(CLONE_ENVIRONMENT, clone_proxy),
                "resources": resources,
                "securityContext": _container_security(),
                "volumeMounts": clone_mounts,
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "File",
            }
        )

    pod_spec: dict = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": max(1, math.ceil(limits.timeout_s)),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Sessions reach nothing but the proxy, by address; a resolver that
        # answers nothing makes a lookup fail at once instead of timing out
        # against a cluster DNS the NetworkPolicy does not let them reach.
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "fsGroup": SANDBOX_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [workload],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(name, namespace, labels),
        "spec": pod_spec,
    }


def _resources(spec: LaunchSpec) -> dict:
    limits = spec.limits
    disk_mb = max(1, int(limits.disk_mb))
    # TODO: `pids` has no per-Pod field (the kubelet's podPidsLimit is one
    # value per node), so a session's process limit is not enforced here.
    # Requests equal limits: the Pod is in the Guaranteed class and the
    # scheduler reserves all of what the session may use.
    values = {
        "cpu": f"{max(1, math.ceil(limits.cpus * 1000))}m",
        "memory": f"{int(limits.memory_mb)}Mi",
        "ephemeral-storage": f"{2 * disk_mb + LOG_STORAGE_MB}Mi",
    }
    return {"requests": dict(values), "limits": dict(values)}


def _container_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": SANDBOX_UID,
        "runAsGroup": SANDBOX_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _environment(base: dict[str, str], proxy_url: str | None) -> list[dict]:
    values = dict(base)
    if proxy_url:
        # TODO: hosts with a service binding need the egress proxy's CA in
        # the sandbox (SSL_CERT_FILE and the like); no bundle is mounted into
        # session Pods yet, so TLS to an intercepted host fails verification.
        values.update(dict.fromkeys(PROXY_VARIABLES, proxy_url))
        values.update(dict.fromkeys(NO_PROXY_VARIABLES, NO_PROXY))
        # Node ignores the proxy variables unless this preload is in place.
        values["NODE_OPTIONS"] = f"--require {NODE_PRELOAD}"
    return [{"name": key, "value": value} for key, value in values.items()]
