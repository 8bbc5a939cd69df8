"""The egress proxy's certificate authority and the bundles made from it.

The proxy terminates TLS only towards hosts with a service binding, with
certificates it signs with a CA of the deployment. The CA is created once, by
the first proxy process to start, in `ENCLAVE_EGRESS_CA_DIR` (by default
`<state_dir>/egress-ca`), readable by the deployment's user alone. Its private
key never leaves that directory.

From it the proxy publishes two bundles beside it, each replaced atomically:

- `sandbox-ca-bundle.pem`: the public roots, the CA's certificate and the
  deployment's extra CA file if any. Workers copy it into each session's
  egress directory, and every TLS stack in the sandbox is pointed at it.
- `upstream-ca-bundle.pem`: the public roots plus the extra CA file; what
  the proxy trusts when it verifies the hosts it connects to.

Workers only read the published sandbox bundle; when it is missing, the
proxy has never started, and a session that needs egress fails to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import certifi

from enclave.errors import ConfigurationError

# mitmproxy's own file names in its confdir; the proxy uses the CA directory as
# that confdir.
CA_BASENAME = "mitmproxy"
CA_CERT_FILE = f"{CA_BASENAME}-ca-cert.pem"
SANDBOX_BUNDLE = "sandbox-ca-bundle.pem"
UPSTREAM_BUNDLE = "upstream-ca-bundle.pem"
LOCK_FILE = ".lock"
KEY_SIZE = 2048


def ca_directory(settings) -> Path:
    if settings.egress_ca_dir:
        return Path(settings.egress_ca_dir)
    return Path(settings.state_dir) / "egress-ca"


def sandbox_bundle_path(settings) -> Path:
    return ca_directory(settings) / SANDBOX_BUNDLE


def prepare_authority(settings) -> Path:
    """Create the CA if needed and publish both bundles; the proxy calls this.

    Returns the directory, for mitmproxy's `confdir`.
    """
    from mitmproxy.certs import CertStore

    directory = ca_directory(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with _locked(directory / LOCK_FILE):
        # Creates the key and certificate on the first start only.
        CertStore.from_store(directory, CA_BASENAME, KEY_SIZE)
        roots = Path(certifi.where()).read_bytes()
        extra = _extra_certificates(settings)
        ca_cert = (directory / CA_CERT_FILE).read_bytes()
        _publish(directory / UPSTREAM_BUNDLE, roots, extra)
        _publish(directory / SANDBOX_BUNDLE, roots, ca_cert, extra)
    return directory


def upstream_bundle_path(settings) -> Path:
    return ca_directory(settings) / UPSTREAM_BUNDLE


def _extra_certificates(settings) -> bytes:
    if not settings.egress_extra_ca_file:
        return b""
    try:
        extra = Path(settings.egress_extra_ca_file).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"ENCLAVE_EGRESS_EXTRA_CA_FILE cannot be read: {exc.strerror}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in extra:
        raise ConfigurationError(
            "ENCLAVE_EGRESS_EXTRA_CA_FILE holds no PEM certificate"
        )
    return extra


def _publish(path: Path, *parts: bytes) -> None:
    """Write the concatenated PEM parts to `path` by an atomic rename."""
    content = b"".join(
        part if part.endswith(b"\n") else part + b"\n" for part in parts if part
    )
    fd, temporary = tempfile.mkstemp(prefix=".bundle-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as target:
            target.write(content)
        # Certificates only: a bundle is public, and workers copy it.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise proxies starting at once, so that only one creates the CA."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
