"""The manifests under deploy/kubernetes, rendered and moved to the tests' namespaces.

`render()` runs `kubectl kustomize` on the base, as an operator's
`kubectl apply -k` would. `retarget()` moves the result from the
namespaces the base names (`enclave`, `enclave-sessions`) to the ones a test
made, everywhere a namespace is named: the objects' own namespaces, the
Namespace objects and their name label, RoleBinding subjects, NetworkPolicy
namespace selectors and the settings in the ConfigMap.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.k8s.cluster import BUILD_HINT, binaries_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = REPO_ROOT / "deploy" / "kubernetes"
CONTROL_NAMESPACE = "enclave"
SESSIONS_NAMESPACE = "enclave-sessions"
NAME_LABEL = "kubernetes.io/metadata.name"
NAMESPACE_SETTINGS = {
    "ENCLAVE_KUBERNETES_NAMESPACE",
    "ENCLAVE_KUBERNETES_EGRESS_NAMESPACE",
}


def kubectl() -> str:
    bundled = binaries_dir() / "kubectl"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError(f"kubectl is missing: {BUILD_HINT}")
    return found


def render() -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(BASE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def retarget(documents: list[dict], control: str, sessions: str) -> list[dict]:
    names = {CONTROL_NAMESPACE: control, SESSIONS_NAMESPACE: sessions}
    moved = []
    for original in documents:
        doc = copy.deepcopy(original)
        metadata = doc.setdefault("metadata", {})
        if metadata.get("namespace") in names:
            metadata["namespace"] = names[metadata["namespace"]]
        if doc["kind"] == "Namespace":
            metadata["name"] = names[metadata["name"]]
            metadata["labels"][NAME_LABEL] = metadata["name"]
        for subject in doc.get("subjects") or []:
            if subject.get("namespace") in names:
                subject["namespace"] = names[subject["namespace"]]
        for rule in doc.get("rules") or []:
            if rule.get("resourceNames"):
                rule["resourceNames"] = [names.get(n, n) for n in rule["resourceNames"]]
        if doc["kind"] == "NetworkPolicy":
            for rule in doc["spec"].get("ingress") or []:
                for peer in rule.get("from") or []:
                    labels = (peer.get("namespaceSelector") or {}).get("matchLabels")
                    if labels and labels.get(NAME_LABEL) in names:
                        labels[NAME_LABEL] = names[labels[NAME_LABEL]]
        if doc["kind"] == "ConfigMap":
            for key in NAMESPACE_SETTINGS & set(doc.get("data") or {}):
                doc["data"][key] = names.get(doc["data"][key], doc["data"][key])
        moved.append(doc)
    return moved
