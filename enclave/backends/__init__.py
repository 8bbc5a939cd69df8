"""Sandbox backends behind one interface, chosen by `ENCLAVE_BACKEND`."""

from __future__ import annotations

import importlib

from enclave.backends.base import BackendEventSink, BackendHealth, SessionBackend
from enclave.errors import ConfigurationError

BACKENDS = {
    "simulator": "enclave.backends.simulator:SimulatorBackend",
    "local": "enclave.backends.local:LocalBackend",
    "docker": "enclave.backends.docker:DockerBackend",
    "kubernetes": "enclave.backends.kubernetes:KubernetesBackend",
}

__all__ = ["BackendEventSink", "BackendHealth", "SessionBackend", "create_backend"]


def create_backend(settings) -> SessionBackend:
    """Build the backend named by the settings; its module loads only when chosen."""
    target = BACKENDS.get(settings.backend)
    if target is None:
        raise ConfigurationError(
            f"ENCLAVE_BACKEND={settings.backend!r} is not one of {sorted(BACKENDS)}"
        )
    module_name, class_name = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(settings)
