"""A stand-in for GitHub: the App API and the git host share one token ledger.

`GitHubStandIn` keeps the repositories, the installations of one GitHub App and
every installation token it minted. `api_app()` serves the endpoints a GitHub
App uses, with GitHub's status codes and bodies:

* `GET /repos/{owner}/{repo}/installation` (app JWT): the installation
  that covers the repository, or 404 for a missing repository and for one the
  app is not installed on alike;
* `POST /app/installations/{id}/access_tokens` (app JWT): a `ghs_` token
  limited to the `repositories` and `permissions` asked for; 404 for an unknown
  installation, 403 for a suspended one, 422 for a repository outside the
  installation or a permission it was not granted;
* `DELETE /installation/token` (the token itself): revokes it; 401 for a token
  that is unknown, expired or already revoked.

The app JWT must be RS256, signed by the app's key, issued by the app's id,
and live at most ten minutes, or the answer is 401. `authorize_git` is the
git host's side (see `tests.gitserver.GitHTTPApp`): it accepts
`x-access-token:<token>` for as long as the token is neither expired nor
revoked, and only for the repositories it was minted for.

Knobs for failure tests: `rate_limited`, `fail_status` (answer every API call
with that status), `api_delay_s`, `over_grant` (answer a token request with
more permissions than asked), `token_lifetime_s`.
"""

from __future__ import annotations

import datetime as dt
import secrets
import string
import threading
import time
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, jsonify, request

MAX_JWT_LIFETIME_S = 600
TOKEN_ALPHABET = string.ascii_letters + string.digits
DOCS = "https://docs.github.com/rest"


def generate_app_key() -> tuple[str, str]:
    """A GitHub App key pair as PEM text: (private, public)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode()
    )
    return private, public


@dataclass
class Repository:
    id: int
    owner: str
    name: str
    private: bool = True

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class Installation:
    id: int
    account: str
    repositories: set[str]  # lower-cased full names
    permissions: dict[str, str] = field(
        default_factory=lambda: {"contents": "read", "metadata": "read"}
    )
    suspended: bool = False


@dataclass
class Grant:
    """One minted installation token and what it may do."""

    token: str
    installation_id: int
    repositories: frozenset[str]
    permissions: dict[str, str]
    expires_at: float
    revoked: bool = False

    def usable(self, now: float | None = None) -> bool:
        return not self.revoked and (now or time.time()) < self.expires_at


class GitHubStandIn:
    def __init__(
        self, *, app_id: str, public_key: str, token_lifetime_s: float = 3600
    ) -> None:
        self.app_id = app_id
        self.public_key = public_key
        self.token_lifetime_s = token_lifetime_s
        self.repositories: dict[str, Repository] = {}
        self.installations: dict[int, Installation] = {}
        self.grants: dict[str, Grant] = {}
        self.minted: list[Grant] = []
        self.api_calls: list[tuple[str, str, int]] = []
        self.rate_limited = False
        self.fail_status: int | None = None
        self.api_delay_s = 0.0
        self.over_grant = False
        self._released = threading.Event()
        self._lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------

    def add_repository(self, owner: str, name: str, *, private: bool = True) -> None:
        repository = Repository(len(self.repositories) + 1000, owner, name, private)
        self.repositories[repository.full_name.lower()] = repository

    def install(
        self,
        installation_id: int,
        account: str,
        repositories: list[str],
        *,
        permissions: dict[str, str] | None = None,
        suspended: bool = False,
    ) -> None:
        self.installations[installation_id] = Installation(
            id=installation_id,
            account=account,
            repositories={name.lower() for name in repositories},
            permissions=permissions or {"contents": "read", "metadata": "read"},
            suspended=suspended,
        )

    def stop(self) -> None:
        self._released.set()

    # -- the git host's side ---------------------------------------------------------

    def authorize_git(
        self, full_name: str, username: str | None, password: str | None
    ) -> int:
        repository = self.repositories.get(full_name.lower())
        if username is None:
            if repository is not None and not repository.private:
                return 200
            return 401
        grant = self.grants.get(password or "")
        if username != "x-access-token" or grant is None or not grant.usable():
            return 401
        if repository is None or full_name.lower() not in grant.repositories:
            return 404
        return 200

    def token_usable(self, token: str) -> bool:
        grant = self.grants.get(token)
        return grant is not None and grant.usable()

    # -- the API -------------------------------------------------------------------

    def api_app(self) -> Flask:
        app = Flask("github-standin")
        stand_in = self

        @app.before_request
        def knobs():
            if stand_in.api_delay_s:
                stand_in._released.wait(stand_in.api_delay_s)
            if stand_in.fail_status:
                return _error(stand_in.fail_status, "Server Error")
            if stand_in.rate_limited:
                response = _error(
                    403, "API rate limit exceeded for installation. Check the docs."
                )
                response.headers["X-RateLimit-Limit"] = "5000"
                response.headers["X-RateLimit-Remaining"] = "0"
                response.headers["X-RateLimit-Reset"] = str(int(time.time()) + 42)
                return response
            return None

        @app.after_request
        def record(response):
            with stand_in._lock:
                stand_in.api_calls.append(
                    (request.method, request.path, response.status_code)
                )
            return response

        @app.get("/repos/<owner>/<repo>/installation")
        def repository_installation(owner, repo):
            if not stand_in._app_authenticated():
                return _error(401, "A JSON web token could not be decoded")
            full_name = f"{owner}/{repo}".lower()
            if full_name in stand_in.repositories:
                for installation in stand_in.installations.values():
                    if full_name in installation.repositories:
                        return jsonify(stand_in._installation_body(installation))
            return _error(404, "Not Found")

        @app.post("/app/installations/<int:installation_id>/access_tokens")
        def access_tokens(installation_id):
            if not stand_in._app_authenticated():
                return _error(401, "A JSON web token could not be decoded")
            installation = stand_in.installations.get(installation_id)
            if installation is None:
                return _error(404, "Not Found")
            if installation.suspended:
                return _error(403, "This installation has been suspended")
            body = request.get_json(silent=True) or {}
            return stand_in._mint(installation, body)

        @app.delete("/installation/token")
        def revoke_token():
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            grant = stand_in.grants.get(token.strip())
            if scheme.lower() not in ("bearer", "token") or grant is None:
                return _error(401, "Bad credentials")
            if not grant.usable():
                return _error(401, "Bad credentials")
            grant.revoked = True
            return "", 204

        return app

    # -- inner steps ------------------------------------------------------------------

    def _app_authenticated(self) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["RS256"],
                issuer=self.app_id,
                options={"require": ["exp", "iat", "iss"]},
                leeway=60,
            )
        except jwt.PyJWTError:
            return False
        return claims["exp"] - claims["iat"] <= MAX_JWT_LIFETIME_S + 60

    def _installation_body(self, installation: Installation) -> dict:
        return {
            "id": installation.id,
            "app_id": int(self.app_id),
            "account": {"login": installation.account, "type": "Organization"},
            "target_type": "Organization",
            "repository_selection": "selected",
            "permissions": installation.permissions,
            "suspended_at": None,
        }

    def _mint(self, installation: Installation, body: dict):
        names = body.get("repositories")
        if names is None:
            wanted = set(installation.repositories)
        else:
            wanted = {f"{installation.account}/{name}".lower() for name in names}
        if not wanted <= installation.repositories or not all(
            name in self.repositories for name in wanted
        ):
            return _error(
                422,
                "There is at least one repository that does not exist or is not "
                "accessible to the parent installation.",
            )
        permissions = body.get("permissions") or dict(installation.permissions)
        for name, level in permissions.items():
            if installation.permissions.get(name) not in (level, "write"):
                return _error(
                    422,
                    "The permissions requested are not granted to this installation.",
                )
        granted = {**permissions, "metadata": "read"}
        if self.over_grant:
            granted["administration"] = "write"

        token = "ghs_" + "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(36))
        expires_at = time.time() + self.token_lifetime_s
        grant = Grant(
            token=token,
            installation_id=installation.id,
            repositories=frozenset(wanted),
            permissions=granted,
            expires_at=expires_at,
        )
        with self._lock:
            self.grants[token] = grant
            self.minted.append(grant)
        repositories = [self.repositories[name] for name in sorted(wanted)]
        response = jsonify(
            {
                "token": token,
                "expires_at": dt.datetime.fromtimestamp(expires_at, dt.UTC)
                .replace(microsecond=0)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "permissions": granted,
                "repository_selection": "selected",
                "repositories": [
                    {
                        "id": r.id,
                        "name": r.name,
                        "full_name": r.full_name,
                        "private": r.private,
                    }
                    for r in repositories
                ],
            }
        )
        response.status_code = 201
        return response


def _error(status: int, message: str):
    response = jsonify({"message": message, "documentation_url": DOCS})
    response.status_code = status
    return response
