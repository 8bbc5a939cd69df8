"""Fixtures for tests of one backend alone: settings with a private state directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave.config import Settings


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def settings(state_dir: Path) -> Settings:
    """Settings as a worker loads them, with the state kept under tmp_path."""
    return Settings.load(
        {
            "ENCLAVE_ENV": "test",
            "ENCLAVE_AUTH_DISABLED": "1",
            "ENCLAVE_STATE_DIR": str(state_dir),
        }
    )
