"""The host's side of the clone step: token file, command line, error wording."""

from __future__ import annotations

import datetime as dt
import stat

import pytest

from enclave.broker import GitCredential, parse_git_url
from enclave.broker.clone import (
    CloneStep,
    describe_clone_failure,
    remove_token_file,
    write_token_file,
)
from enclave.sandbox import clone_step

URL = "https://github.com/acme/app.git"
TOKEN = "ghs_" + "t" * 36


def _credential() -> GitCredential:
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    return GitCredential(
        repository=parse_git_url(URL),
        token=TOKEN,
        username="x-access-token",
        permissions=(("contents", "read"),),
        issued_at=now,
        expires_at=now + dt.timedelta(hours=1),
        provider="github_app",
        installation_id=42,
    )


def test_write_token_file_is_private_to_its_owner(tmp_path):
    path = write_token_file(tmp_path / "secret", _credential())

    assert path.read_text() == TOKEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_write_token_file_refuses_to_reuse_a_file(tmp_path):
    write_token_file(tmp_path / "secret", _credential())

    with pytest.raises(FileExistsError):
        write_token_file(tmp_path / "secret", _credential())


def test_remove_token_file_removes_the_file_and_its_directory(tmp_path):
    path = write_token_file(tmp_path / "secret", _credential())

    remove_token_file(path)
    remove_token_file(path)

    assert not path.parent.exists()


def test_clone_step_argv_names_the_token_file_never_the_token():
    argv = CloneStep(
        url=URL,
        ref="main",
        dest="/workspace",
        timeout_s=30,
        token_file="/run/enclave-git/token",
    ).argv()

    assert argv[:2] == ["/usr/bin/python3", "/opt/enclave/sandbox/clone_step.py"]
    assert argv[argv.index("--token-file") + 1] == "/run/enclave-git/token"
    assert argv[argv.index("--askpass") + 1] == "/opt/enclave/sandbox/git_askpass.py"
    assert argv[argv.index("--ref") + 1] == "main"
    assert TOKEN not in " ".join(argv)


def test_clone_step_argv_of_a_public_repository_has_no_token_file():
    argv = CloneStep(url=URL, ref=None, dest="/workspace", timeout_s=2.5).argv()

    assert "--token-file" not in argv
    assert "--ref" not in argv
    assert argv[argv.index("--timeout-s") + 1] == "2.5"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (clone_step.EXIT_NOT_FOUND, f"repository not found: {URL}"),
        (clone_step.EXIT_AUTH_DENIED, f"the git host refused the credential for {URL}"),
        (clone_step.EXIT_BAD_REF, f"ref v9 is not a branch, tag or commit of {URL}"),
        (clone_step.EXIT_TIMEOUT, f"cloning {URL} did not finish within 30s"),
        (clone_step.EXIT_NETWORK, f"the git host of {URL} could not be reached"),
        (clone_step.EXIT_NO_SPACE, "does not fit in the session's disk space"),
        (clone_step.EXIT_GIT_FAILED, f"git failed while cloning {URL}"),
        (137, f"the clone step failed (exit code 137) for {URL}"),
    ],
)
def test_describe_clone_failure_says_which_failure(code, expected):
    message = describe_clone_failure(
        code, url=URL, ref="v9", timeout_s=30, with_token=True
    )

    assert message.startswith("clone failed: ")
    assert expected in message


def test_describe_clone_failure_without_a_token_does_not_claim_it_is_missing():
    message = describe_clone_failure(
        clone_step.EXIT_NOT_FOUND, url=URL, ref=None, timeout_s=30, with_token=False
    )

    assert "private and no credential was issued" in message


def test_clone_step_exit_codes_are_distinct():
    codes = [
        clone_step.EXIT_USAGE,
        clone_step.EXIT_NOT_FOUND,
        clone_step.EXIT_AUTH_DENIED,
        clone_step.EXIT_BAD_REF,
        clone_step.EXIT_TIMEOUT,
        clone_step.EXIT_NETWORK,
        clone_step.EXIT_NO_SPACE,
        clone_step.EXIT_GIT_FAILED,
    ]

    assert len(set(codes)) == len(codes)
    assert set(codes) == set(clone_step.MESSAGES)
