"""Git source URLs and refs: what a session may ask to clone, normalised.

A source is `https://<host>/<owner>/<repo>` with an optional `.git`. Nothing
else is accepted: no other scheme (it would pick another git transport), no
user or password (a caller must never hand a secret in a URL, and the URL is
stored and shown), no query, fragment or percent-encoding, no deeper path. The
error messages never repeat the input, since a rejected URL may be exactly the
one carrying a password.

Refs are checked with git's own rules for ref names plus two of our own: no
leading `-` (it would read as an option) and no `:` or leading `+` (they would
turn the ref into a refspec).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from enclave.broker.errors import InvalidGitSource

MAX_URL_LENGTH = 2048
MAX_REF_LENGTH = 255

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}$")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True)
class GitRepository:
    """One repository on one host; `host` may carry a port other than 443."""

    host: str
    owner: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def key(self) -> str:
        """The name to compare by: git hosts treat owners and names case-blind."""
        return f"{self.host}/{self.owner}/{self.name}".lower()

    @property
    def url(self) -> str:
        return f"https://{self.host}/{self.owner}/{self.name}.git"

    def __str__(self) -> str:
        return f"{self.host}/{self.owner}/{self.name}"


def parse_git_url(url: object) -> GitRepository:
    """The repository an `https://` git URL names, or `InvalidGitSource`."""
    if not isinstance(url, str) or not url:
        raise InvalidGitSource("A git URL is required.")
    if len(url) > MAX_URL_LENGTH or _URL_FORBIDDEN.search(url):
        raise InvalidGitSource("The git URL holds characters a URL cannot.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidGitSource("The git URL is not a valid URL.") from None

    if parts.scheme.lower() != "https":
        raise InvalidGitSource("Only https:// git URLs are accepted.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidGitSource(
            "A git URL must not carry a user name or password; "
            "private repositories are reached through the deployment's entitlements."
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise InvalidGitSource("A git URL must not have a query or fragment.")
    host = _check_host(parts.hostname or "")
    if port is not None and port != 443:
        host = f"{host}:{port}"

    path = parts.path
    if "%" in path:
        raise InvalidGitSource("A git URL must not be percent-encoded.")
    path = path.removesuffix("/")
    segments = path.split("/")
    if len(segments) != 3 or segments[0] != "":
        raise InvalidGitSource(
            "A git URL must have the form https://<host>/<owner>/<repository>."
        )
    owner, name = segments[1], segments[2]
    name = name.removesuffix(".git")
    if not _OWNER.match(owner):
        raise InvalidGitSource("The repository owner in the git URL is not valid.")
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidGitSource("The repository name in the git URL is not valid.")

    return GitRepository(host=host, owner=owner, name=name)


def parse_repository_name(entry: str, default_host: str) -> GitRepository:
    """`owner/name` or `host/owner/name` as written in the entitlements file."""
    parts = entry.strip().split("/")
    if len(parts) == 2:
        parts = [default_host, *parts]
    if len(parts) != 3:
        raise ValueError(f"{entry!r} is not owner/name or host/owner/name")
    return parse_git_url("https://{}/{}/{}".format(*parts))


def validate_ref(ref: object) -> str | None:
    """A branch, tag or commit name that is safe to hand to git, or `None`."""
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref:
        raise InvalidGitSource("A ref must be a non-empty string.", field="ref")
    if len(ref) > MAX_REF_LENGTH:
        raise InvalidGitSource(
            f"A ref must be at most {MAX_REF_LENGTH} characters.", field="ref"
        )
    problems = (
        _REF_FORBIDDEN.search(ref),
        ref.startswith(("-", "+", "/", ".")),
        ref.endswith(("/", ".", ".lock")),
        ".." in ref,
        "//" in ref,
        "/." in ref,
        "@{" in ref,
        ref == "@",
    )
    if any(problems):
        raise InvalidGitSource(
            "The ref is not a valid branch, tag or commit name.", field="ref"
        )
    return ref


def _check_host(hostname: str) -> str:
    hostname = hostname.lower()
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is not None:
        if address.version != 4:
            raise InvalidGitSource("IPv6 literals are not accepted in git URLs.")
        return hostname
    labels = hostname.split(".")
    if len(hostname) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidGitSource("The host in the git URL is not a valid host name.")
    return hostname
