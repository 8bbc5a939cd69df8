"""The clone step as a plain subprocess against the stand-in git host.

It runs on Debian's own /usr/bin/python3 (the sandbox image's interpreter),
outside the project's virtualenv, which also proves it needs nothing beyond
the standard library.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from enclave.broker import parse_git_url
from enclave.broker.clone import CloneStep, write_token_file
from enclave.sandbox import DIRECTORY, GIT_ASKPASS
from enclave.sandbox import clone_step as step
from tests.gitserver import ConnectProxy

SANDBOX_PYTHON = Path("/usr/bin/python3")
BASE_ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(autouse=True)
def _needs_system_python():
    if not SANDBOX_PYTHON.exists():
        pytest.fail(
            f"{SANDBOX_PYTHON} is needed to run the clone step: apt-get install python3",
            pytrace=False,
        )


def mint(git_host, full_name: str = "acme/app"):
    """A token for one repository, as the broker would mint it."""
    provider = git_host.provider()
    repository = parse_git_url(git_host.url(full_name))
    return provider.issue(
        repository, installation_id=provider.installation_for(repository)
    )


@pytest.fixture
def credential(git_host):
    """A token for acme/app; revoked afterwards."""
    minted = mint(git_host)
    yield minted
    git_host.provider().revoke(minted)


def run_clone(
    git_host,
    tmp_path: Path,
    full_name: str,
    *,
    ref: str | None = None,
    credential=None,
    timeout_s: float = 30,
    env: dict[str, str] | None = None,
    ca_argument: bool = True,
    dest: Path | None = None,
) -> tuple[subprocess.CompletedProcess, Path]:
    dest = dest or tmp_path / "checkout"
    token_file = None
    if credential is not None:
        token_file = write_token_file(tmp_path / "secret", credential)
    clone = CloneStep(
        url=git_host.url(full_name),
        ref=ref,
        dest=str(dest),
        timeout_s=timeout_s,
        token_file=str(token_file) if token_file else None,
        ca_bundle=str(git_host.tls.ca) if ca_argument else None,
        program_dir=str(DIRECTORY),
        python=str(SANDBOX_PYTHON),
    )
    completed = subprocess.run(
        clone.argv(),
        env={**BASE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        check=False,
    )
    return completed, dest


def assert_token_nowhere(token: str, *places: Path | str) -> None:
    """No file under the given directories, and no given text, holds the token."""
    needle = token.encode()
    for place in places:
        if isinstance(place, str):
            assert token not in place
            continue
        for directory, _, files in os.walk(place):
            for name in files:
                path = Path(directory, name)
                if path.is_symlink():
                    continue
                assert needle not in path.read_bytes(), f"the token is in {path}"


def _commit(completed) -> str:
    return json.loads(completed.stdout)["commit"]


def test_clone_step_checks_out_a_branch(git_host, tmp_path, credential):
    repository = git_host.repositories["acme/app"]

    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref="feature", credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "feature\n"
    assert (dest / "feature.txt").exists()
    assert _commit(completed) == repository.commits["feature"]
    # A shallow fetch: only the one commit came over.
    assert (dest / ".git" / "shallow").exists()


def test_clone_step_checks_out_a_tag(git_host, tmp_path, credential):
    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref="v1.0", credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "tagged\n"
    assert _commit(completed) == git_host.repositories["acme/app"].commits["tagged"]


def test_clone_step_checks_out_a_commit(git_host, tmp_path, credential):
    first = git_host.repositories["acme/app"].commits["first"]

    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref=first, credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "first\n"
    assert not (dest / "app.py").exists()
    assert _commit(completed) == first


def test_clone_step_checks_out_a_short_commit_id(git_host, tmp_path, credential):
    tagged = git_host.repositories["acme/app"].commits["tagged"]

    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref=tagged[:10], credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "tagged\n"


def test_clone_step_without_a_ref_takes_the_default_branch(
    git_host, tmp_path, credential
):
    completed, dest = run_clone(git_host, tmp_path, "acme/app", credential=credential)

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "main\n"


def test_clone_step_falls_back_when_the_host_refuses_a_commit_by_id(
    strict_git_host, tmp_path
):
    git_host = strict_git_host
    credential = mint(git_host)
    first = git_host.repositories["acme/app"].commits["first"]

    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref=first, credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "first\n"
    # The full fetch of the fallback, not a shallow one.
    assert not (dest / ".git" / "shallow").exists()
    assert_token_nowhere(credential.token, dest, completed.stdout, completed.stderr)


def test_clone_step_clones_a_public_repository_without_a_token(git_host, tmp_path):
    completed, dest = run_clone(git_host, tmp_path, "octo/hello", ref="main")

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "main\n"
    assert all(request.username is None for request in git_host.git.requests)


def test_clone_step_leaves_no_token_in_the_checkout(git_host, tmp_path, credential):
    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref="main", credential=credential
    )

    assert completed.returncode == 0, completed.stderr
    # The git host really saw the token: it is the one to look for.
    assert any(r.password == credential.token for r in git_host.git.requests)
    assert_token_nowhere(credential.token, dest, completed.stdout, completed.stderr)
    config = (dest / ".git" / "config").read_text()
    assert f"url = {git_host.url('acme/app')}\n" in config
    assert "x-access-token" not in config
    assert "credential" not in config
    assert not (dest / ".git" / "FETCH_HEAD").exists()
    assert not (dest / ".git" / "hooks").exists()


def test_clone_step_wrong_ref_fails_with_its_own_code(git_host, tmp_path, credential):
    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref="no-such-branch", credential=credential
    )

    assert completed.returncode == step.EXIT_BAD_REF
    assert completed.stderr == (
        "clone failed: ref no-such-branch is not a branch, tag or commit of "
        f"{git_host.url('acme/app')}\n"
    )
    assert_token_nowhere(credential.token, dest, completed.stdout, completed.stderr)


def test_clone_step_unknown_commit_is_a_bad_ref(git_host, tmp_path, credential):
    completed, _ = run_clone(
        git_host, tmp_path, "acme/app", ref="0" * 40, credential=credential
    )

    assert completed.returncode == step.EXIT_BAD_REF


def test_clone_step_missing_repository_fails_with_its_own_code(
    git_host, tmp_path, credential
):
    completed, dest = run_clone(
        git_host, tmp_path, "acme/missing", ref="main", credential=credential
    )

    assert completed.returncode == step.EXIT_NOT_FOUND
    assert completed.stderr == (
        f"clone failed: repository not found: {git_host.url('acme/missing')}\n"
    )
    assert_token_nowhere(credential.token, dest, completed.stdout, completed.stderr)


def test_clone_step_private_repository_without_a_token_is_not_found(git_host, tmp_path):
    completed, _ = run_clone(git_host, tmp_path, "acme/app", ref="main")

    assert completed.returncode == step.EXIT_NOT_FOUND
    assert "private and no credential was issued" in completed.stderr


def test_clone_step_token_of_another_repository_does_not_open_this_one(
    git_host, tmp_path, credential
):
    completed, _ = run_clone(
        git_host, tmp_path, "acme/other", ref="main", credential=credential
    )

    assert completed.returncode == step.EXIT_NOT_FOUND


def test_clone_step_revoked_token_is_denied(git_host, tmp_path, credential):
    git_host.provider().revoke(credential)

    completed, dest = run_clone(
        git_host, tmp_path, "acme/app", ref="main", credential=credential
    )

    assert completed.returncode == step.EXIT_AUTH_DENIED
    assert completed.stderr == (
        "clone failed: the git host refused the credential for "
        f"{git_host.url('acme/app')}\n"
    )
    assert_token_nowhere(credential.token, dest, completed.stdout, completed.stderr)


def test_clone_step_honours_its_deadline(git_host, tmp_path, credential):
    git_host.git.delay_s = 20
    started = time.monotonic()

    completed, _ = run_clone(
        git_host, tmp_path, "acme/app", ref="main", credential=credential, timeout_s=1
    )

    assert completed.returncode == step.EXIT_TIMEOUT
    assert completed.stderr == (
        f"clone failed: cloning {git_host.url('acme/app')} did not finish within 1s\n"
    )
    assert time.monotonic() - started < 6


def test_clone_step_goes_through_the_proxy_in_the_environment(
    git_host, tmp_path, credential
):
    proxy = ConnectProxy().start()
    # The egress proxy identifies a session by credentials in the proxy URL.
    proxy_url = proxy.url.replace("http://", "http://ses_1:proxy-secret@")
    try:
        completed, dest = run_clone(
            git_host,
            tmp_path,
            "acme/app",
            ref="main",
            credential=credential,
            env={"HTTPS_PROXY": proxy_url, "https_proxy": proxy_url},
        )
    finally:
        proxy.stop()

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "main\n"
    assert proxy.tunnels
    assert set(proxy.tunnels) == {git_host.host}
    expected = "Basic " + base64.b64encode(b"ses_1:proxy-secret").decode()
    assert set(proxy.authorizations) == {expected}


def test_clone_step_proxy_refusal_is_a_network_failure(git_host, tmp_path, credential):
    proxy = ConnectProxy(refuse=True).start()
    try:
        completed, _ = run_clone(
            git_host,
            tmp_path,
            "acme/app",
            ref="main",
            credential=credential,
            env={"HTTPS_PROXY": proxy.url, "https_proxy": proxy.url},
        )
    finally:
        proxy.stop()

    assert completed.returncode == step.EXIT_NETWORK
    assert proxy.tunnels == [git_host.host]


@pytest.mark.parametrize("variable", ["GIT_SSL_CAINFO", "SSL_CERT_FILE"])
def test_clone_step_takes_the_ca_bundle_from_the_environment(
    git_host, tmp_path, credential, variable
):
    completed, dest = run_clone(
        git_host,
        tmp_path,
        "acme/app",
        ref="main",
        credential=credential,
        ca_argument=False,
        env={variable: str(git_host.tls.ca)},
    )

    assert completed.returncode == 0, completed.stderr
    assert (dest / "VERSION").read_text() == "main\n"


def test_clone_step_refuses_a_host_it_cannot_verify(git_host, tmp_path, credential):
    completed, _ = run_clone(
        git_host,
        tmp_path,
        "acme/app",
        ref="main",
        credential=credential,
        ca_argument=False,
    )

    assert completed.returncode == step.EXIT_NETWORK
    assert all(r.password is None for r in git_host.git.requests)


def test_clone_step_refuses_a_destination_that_is_not_empty(
    git_host, tmp_path, credential
):
    dest = tmp_path / "checkout"
    dest.mkdir()
    (dest / "main.py").write_text("print('hello')\n")

    completed, _ = run_clone(
        git_host, tmp_path, "acme/app", credential=credential, dest=dest
    )

    assert completed.returncode == step.EXIT_USAGE
    assert (dest / "main.py").read_text() == "print('hello')\n"


def test_clone_step_refuses_a_url_with_credentials_without_echoing_it(tmp_path):
    completed = subprocess.run(
        [
            str(SANDBOX_PYTHON),
            str(DIRECTORY / "clone_step.py"),
            "--url",
            "https://x-access-token:ghs_SECRETVALUE@github.com/acme/app.git",
            "--dest",
            str(tmp_path / "checkout"),
            "--timeout-s",
            "5",
        ],
        env=BASE_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert completed.returncode == step.EXIT_USAGE
    assert "SECRETVALUE" not in completed.stderr + completed.stdout
    assert not (tmp_path / "checkout").exists()


def test_clone_step_sigterm_ends_git_and_its_helpers(git_host, tmp_path, credential):
    git_host.git.delay_s = 20
    token_file = write_token_file(tmp_path / "secret", credential)
    url = git_host.url("acme/app")
    clone = CloneStep(
        url=url,
        ref="main",
        dest=str(tmp_path / "checkout"),
        timeout_s=60,
        token_file=str(token_file),
        ca_bundle=str(git_host.tls.ca),
        program_dir=str(DIRECTORY),
        python=str(SANDBOX_PYTHON),
    )
    process = subprocess.Popen(
        clone.argv(),
        env=BASE_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    # git's own processes, not the clone step's (its command line names the URL too).
    while not _processes_naming(url, exclude=process.pid):
        assert time.monotonic() < deadline, "git never started"
        time.sleep(0.05)

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=10) == 128 + signal.SIGTERM
    assert _processes_naming(url, exclude=process.pid) == []


def test_git_askpass_answers_only_for_the_repositorys_host(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("ghs_example\n")
    env = {
        **BASE_ENV,
        "ENCLAVE_GIT_HOST": "git.example.com:8443",
        "ENCLAVE_GIT_TOKEN_FILE": str(token_file),
    }

    def ask(prompt: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(GIT_ASKPASS), prompt],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    username = ask("Username for 'https://git.example.com:8443': ")
    password = ask("Password for 'https://x-access-token@git.example.com:8443': ")
    elsewhere = ask("Password for 'https://x-access-token@evil.example.com': ")
    proxy = ask("Password for 'http://proxy@127.0.0.1:3128': ")
    other = ask("Are you sure you want to continue connecting (yes/no)? ")

    assert (username.returncode, username.stdout) == (0, "x-access-token\n")
    assert (password.returncode, password.stdout) == (0, "ghs_example\n")
    for refused in (elsewhere, proxy, other):
        assert refused.returncode == 1
        assert refused.stdout == ""


def _processes_naming(text: str, exclude: int | None = None) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
