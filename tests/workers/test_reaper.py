"""A worker that dies mid-session: the reaper ends the session as worker_lost."""

from __future__ import annotations

import signal
import time

from tests.test_service import run, wait_for_phase


def test_worker_killed_mid_session_ends_as_worker_lost(stack_factory):
    stack = stack_factory(workers=1)
    client, session_id = run(stack, "org_a", "#sim stdout begun\n#sim sleep 120")
    wait_for_phase(client, session_id, {"running"})

    killed_at = time.monotonic()
    stack.kill_worker(0, signal.SIGKILL)
    body = wait_for_phase(
        client, session_id, {"killed", "failed", "succeeded"}, timeout=40
    )

    assert body["phase"] == "killed"
    assert body["kill_reason"] == "worker_lost"
    assert time.monotonic() - killed_at < 30
    result = client.get(f"/sessions/{session_id}/result").json()
    assert result["stdout"] == "begun\n"
    actions = [
        e["action"]
        for e in client.get(f"/sessions/{session_id}/audit").json()["events"]
    ]
    assert "session.killed" in actions and "session.torn_down" in actions
    assert [
        e
        for e in client.get(f"/sessions/{session_id}/audit").json()["events"]
        if e["action"] == "session.killed"
    ][0]["actor"] == "reaper"


def test_surviving_worker_keeps_serving_after_another_dies(stack_factory):
    stack = stack_factory(workers=2)
    stack.kill_worker(0, signal.SIGKILL)

    client, session_id = run(stack, "org_a", "#sim stdout still here")

    assert (
        wait_for_phase(client, session_id, {"succeeded", "failed", "killed"})["phase"]
        == "succeeded"
    )
