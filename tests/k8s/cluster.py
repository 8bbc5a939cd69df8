"""A Kubernetes API server for the tests: a private one on 127.0.0.1, or a real cluster.

`ControlPlane` runs etcd, kube-apiserver and kube-controller-manager from
`$ENCLAVE_TEST_K8S_DIR/bin` (tests/k8s/build-kubernetes.sh builds them from
Debian's packages), each in a process group of its own, in a temporary
directory that goes away with it. The API server listens on 127.0.0.1 only,
serves HTTPS with the certificate it makes for itself, knows one admin by a
static token, authorizes by RBAC and signs service-account tokens, so the
backend can run as the worker's ServiceAccount under the Role the manifests
grant it. There is no scheduler and no kubelet: tests bind Pods and write
their status themselves (`tests.k8s.kubelet`). The watch cache is off, so
that compacting etcd (`compact_etcd`) makes an old watch answer 410.

Lifecycle: `start()` checks the binaries, makes keys and the token file,
starts etcd, then the API server, waits until `/readyz` answers `ok`, then
starts the controller manager (garbage collector, namespaces, service
accounts and their tokens); `stop()` stops them in reverse order and removes
the directory. A failure raises `ControlPlaneError` with the end of the log of
the process that failed.

`ExistingCluster` stands for a cluster named by `ENCLAVE_TEST_KUBECONFIG`:
nothing is started or stopped, and tests that need to play the kubelet or to
reach etcd say so and fail.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes.client
import kubernetes.config
import yaml

from tests.servers import free_port, log_tail, stop_process_group

logger = logging.getLogger(__name__)

K8S_DIR_VARIABLE = "ENCLAVE_TEST_K8S_DIR"
KUBECONFIG_VARIABLE = "ENCLAVE_TEST_KUBECONFIG"
DEFAULT_K8S_DIR = "/var/lib/enclave/k8s"
BUILD_HINT = (
    "build them with `bash tests/k8s/build-kubernetes.sh` (.ci/run does, and "
    f"exports {K8S_DIR_VARIABLE}), or point {KUBECONFIG_VARIABLE} at a real cluster"
)
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,"
    "ResourceQuota,NodeRestriction"
)
CONTROLLERS = "garbagecollector,namespace,serviceaccount,serviceaccount-token"
READY_TIMEOUT_S = 90.0


class ControlPlaneError(RuntimeError):
    """The control plane's binaries are missing, or a part of it did not start."""


def binaries_dir() -> Path:
    return Path(os.environ.get(K8S_DIR_VARIABLE) or DEFAULT_K8S_DIR) / "bin"


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on 127.0.0.1."""

    private = True

    def __init__(self, bindir: Path | None = None):
        self.bindir = Path(bindir or binaries_dir())
        self.root: Path | None = None
        self.admin_token = secrets.token_urlsafe(24)
        self.etcd_port = 0
        self.port = 0
        self._processes: list[tuple[str, subprocess.Popen]] = []

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        # The API server's self-made certificate is its own issuer.
        assert self.root is not None
        return self.root / "certs" / "apiserver.crt"

    @property
    def key_file(self) -> Path:
        assert self.root is not None
        return self.root / "certs" / "apiserver.key"

    @property
    def kubeconfig(self) -> Path:
        assert self.root is not None
        return self.root / "admin.kubeconfig"

    def program(self, name: str) -> Path:
        path = self.bindir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ControlPlaneError(f"{path} is missing: {BUILD_HINT}")
        return path

    def start(self) -> None:
        etcd = self.program("etcd")
        apiserver = self.program("kube-apiserver")
        controller_manager = self.program("kube-controller-manager")
        self.root = Path(tempfile.mkdtemp(prefix="enclave-k8s-"))
        atexit.register(self.stop)
        (self.root / "certs").mkdir()
        _service_account_keys(self.root)
        (self.root / "tokens.csv").write_text(
            f"{self.admin_token},enclave-test-admin,enclave-test-admin,system:masters\n"
        )

        self.etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=test",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                # Durability buys nothing for data thrown away at the end.
                "--unsafe-no-fsync",
            ],
        )
        self.port = free_port()
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={self.root / 'certs'}",
                f"--token-auth-file={self.root / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={self.root / 'sa.pub'}",
                f"--service-account-signing-key-file={self.root / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=false",
                f"--enable-admission-plugins={ADMISSION_PLUGINS}",
                # No Endpoints for the `kubernetes` Service: nothing needs them.
                "--endpoint-reconciler-type=none",
                # Watches go to etcd itself, so a compaction makes them 410.
                "--watch-cache=false",
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        self._wait_ready()
        self.kubeconfig.write_text(self.kubeconfig_for(self.admin_token))
        self._spawn(
            "kube-controller-manager",
            [
                str(controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--port=0",
                "--leader-elect=false",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={self.root / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
            ],
        )
        logger.info("kubernetes control plane up server=%s", self.server)

    def stop(self) -> None:
        for name, process in reversed(self._processes):
            stop_process_group(process, timeout=10.0)
            logger.info("%s stopped", name)
        self._processes.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def kubeconfig_for(self, token: str, server: str | None = None) -> str:
        """A kubeconfig that reaches the API server (or `server`) with `token`."""
        return _kubeconfig(server or self.server, token, str(self.ca_file))

    def admin_client(self) -> kubernetes.client.ApiClient:
        return _client_from(self.kubeconfig)

    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision; watches from before get 410."""
        base = f"http://127.0.0.1:{self.etcd_port}/v3/kv"
        answer = _post_json(f"{base}/range", {"key": base64.b64encode(b"/").decode()})
        revision = int(answer["header"]["revision"])
        _post_json(f"{base}/compaction", {"revision": revision, "physical": True})
        return revision

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.root is not None
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        self._processes.append((name, process))
        time.sleep(0.2)
        if process.poll() is not None:
            raise ControlPlaneError(
                f"{name} exited at once with status {process.returncode}:\n"
                f"{log_tail(log_path)}"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        request = urllib.request.Request(
            f"{self.server}/readyz",
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        context = _unverified_tls()
        while time.monotonic() < deadline:
            for name, process in self._processes:
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with status {process.returncode}:\n"
                        f"{log_tail(self.root / f'{name}.log')}"
                    )
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise ControlPlaneError(
            f"kube-apiserver was not ready within {READY_TIMEOUT_S:.0f}s:\n"
            f"{log_tail(self.root / 'kube-apiserver.log')}"
        )


class ExistingCluster:
    """A cluster that runs already, named by a kubeconfig; used as it is."""

    private = False

    def __init__(self, kubeconfig: str):
        self.kubeconfig = Path(kubeconfig)

    def start(self) -> None:
        if not self.kubeconfig.is_file():
            raise ControlPlaneError(
                f"{KUBECONFIG_VARIABLE}={self.kubeconfig} is no file"
            )

    def stop(self) -> None:
        pass

    def kubeconfig_for(self, token: str, server: str | None = None) -> str:
        """The named cluster's server and CA, with `token` as the user."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        context_name = config.get("current-context")
        context = next(
            c["context"] for c in config["contexts"] if c["name"] == context_name
        )
        cluster = next(
            c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"]
        )
        ca_file = cluster.get("certificate-authority")
        if cluster.get("certificate-authority-data"):
            handle, ca_file = tempfile.mkstemp(prefix="enclave-k8s-ca-")
            os.write(handle, base64.b64decode(cluster["certificate-authority-data"]))
            os.close(handle)
        return _kubeconfig(server or cluster["server"], token, ca_file)

    def admin_client(self) -> kubernetes.client.ApiClient:
        return _client_from(self.kubeconfig)


def start_cluster() -> ControlPlane | ExistingCluster:
    """The real cluster `ENCLAVE_TEST_KUBECONFIG` names, else a private control plane."""
    kubeconfig = os.environ.get(KUBECONFIG_VARIABLE)
    cluster = ExistingCluster(kubeconfig) if kubeconfig else ControlPlane()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _service_account_keys(root: Path) -> None:
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "sa.key"), "2048"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "rsa",
            "-in",
            str(root / "sa.key"),
            "-pubout",
            "-out",
            str(root / "sa.pub"),
        ],
        check=True,
        capture_output=True,
    )


def _kubeconfig(server: str, token: str, ca_file: str | None) -> str:
    cluster: dict = {"server": server}
    if ca_file:
        cluster["certificate-authority"] = ca_file
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [
                {"name": "test", "context": {"cluster": "test", "user": "test"}}
            ],
            "current-context": "test",
        }
    )


def _client_from(kubeconfig: Path) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig),
        client_configuration=configuration,
        persist_config=False,
    )
    return kubernetes.client.ApiClient(configuration)


def _unverified_tls() -> ssl.SSLContext:
    # Only for the readiness probe: the certificate is made by the API server
    # as it starts, and whether it answers is all the probe asks.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
