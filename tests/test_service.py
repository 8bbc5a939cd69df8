"""The whole service end to end: gunicorn (gevent), RQ workers, the reaper,
PostgreSQL and Redis, with the simulator backend standing in for a sandbox."""

from __future__ import annotations

import threading
import time

import pytest

from tests.servers import redis_url_with_db
from tests.stack import ServiceStack

PHASES_OK = ["queued", "provisioning", "running", "succeeded"]


@pytest.fixture(scope="module")
def stack(postgres_server, redis_url, tmp_path_factory):
    import redis

    url = redis_url_with_db(redis_url, 15)
    redis.Redis.from_url(url).flushdb()
    service = ServiceStack(
        database_url=postgres_server.url_for(postgres_server.create_database()),
        redis_url=url,
        workdir=tmp_path_factory.mktemp("service"),
        workers=2,
    )
    with service:
        service.wait_healthy(60)
        yield service


def run(stack, org_id, code, **body):
    client = stack.client(stack.token(org_id))
    response = client.post(
        "/sessions", json={"language": "python", "code": code, **body}
    )
    assert response.status_code == 201, response.text
    return client, response.json()["id"]


def wait_for_phase(client, session_id, phases, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/sessions/{session_id}").json()
        if body["phase"] in phases:
            return body
        time.sleep(0.1)
    raise AssertionError(f"session {session_id} never reached {phases}: {body}")


def test_session_runs_to_success_and_stream_matches_result(stack):
    client, session_id = run(
        stack, "org_a", "#sim stdout hello\n#sim stderr careful\n#sim exit 0"
    )

    events = list(stack.stream(session_id, stack.token("org_a"), timeout=30))

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.data["phase"] for e in events if e.event == "phase"] == PHASES_OK
    assert [e.data["data"] for e in events if e.event == "stdout"] == ["hello\n"]
    assert [e.data["data"] for e in events if e.event == "stderr"] == ["careful\n"]
    assert events[-1].event == "result"
    result = client.get(f"/sessions/{session_id}/result").json()
    assert events[-1].data == result
    assert result["phase"] == "succeeded" and result["exit_code"] == 0
    assert result["stdout"] == "hello\n" and result["stderr"] == "careful\n"
    assert result["duration_ms"] >= 0
    session = client.get(f"/sessions/{session_id}").json()
    assert session["started_at"] and session["finished_at"]


def test_stream_replays_everything_to_a_late_client(stack):
    client, session_id = run(stack, "org_a", "#sim stdout one\n#sim stdout two")
    wait_for_phase(client, session_id, {"succeeded"})

    events = list(stack.stream(session_id, stack.token("org_a"), timeout=10))

    assert [e.event for e in events] == [
        "phase",
        "phase",
        "phase",
        "stdout",
        "stdout",
        "phase",
        "result",
    ]
    assert [e.seq for e in events] == list(range(1, 8))


@pytest.mark.parametrize("use_query", [False, True])
def test_stream_after_last_event_id_gets_exactly_the_later_events(stack, use_query):
    client, session_id = run(stack, "org_a", "#sim stdout one\n#sim stdout two")
    wait_for_phase(client, session_id, {"succeeded"})
    everything = list(stack.stream(session_id, stack.token("org_a"), timeout=10))

    if use_query:
        import requests

        with requests.get(
            f"{stack.base_url}/sessions/{session_id}/stream?last_event_id=4",
            headers={"Authorization": f"Bearer {stack.token('org_a')}"},
            stream=True,
            timeout=10,
        ) as response:
            from tests.stack import parse_sse

            later = list(parse_sse(response.iter_content(chunk_size=None)))
    else:
        later = list(
            stack.stream(session_id, stack.token("org_a"), last_event_id=4, timeout=10)
        )

    assert [(e.seq, e.event, e.data) for e in later] == [
        (e.seq, e.event, e.data) for e in everything if e.seq > 4
    ]


def test_stream_at_the_last_event_closes_at_once(stack):
    client, session_id = run(stack, "org_a", "#sim exit 0")
    wait_for_phase(client, session_id, {"succeeded"})
    last = client.get(f"/sessions/{session_id}").json()

    started = time.monotonic()
    events = list(
        stack.stream(session_id, stack.token("org_a"), last_event_id=5, timeout=10)
    )

    assert events == []
    assert time.monotonic() - started < 5
    assert last["phase"] == "succeeded"


def test_stream_relays_live_events_as_they_happen(stack):
    client, session_id = run(
        stack, "org_a", "#sim stdout first\n#sim sleep 1.5\n#sim stdout second"
    )
    arrivals = {}

    for event in stack.stream(session_id, stack.token("org_a"), timeout=30):
        if event.event == "stdout":
            arrivals[event.data["data"]] = time.monotonic()

    assert arrivals["second\n"] - arrivals["first\n"] >= 1.2


def test_many_watchers_of_one_session_all_get_every_event(stack):
    client, session_id = run(
        stack, "org_a", "#sim sleep 1\n#sim stdout shared\n#sim exit 4"
    )
    seen: list[list[str]] = []

    def watch():
        seen.append(
            [
                e.event
                for e in stack.stream(session_id, stack.token("org_a"), timeout=30)
            ]
        )

    threads = [threading.Thread(target=watch) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(seen) == 20
    assert all(kinds[-1] == "result" and "stdout" in kinds for kinds in seen)
    assert len({tuple(kinds) for kinds in seen}) == 1


def test_stream_sends_keepalive_comments_while_idle(stack):
    import requests

    client, session_id = run(stack, "org_a", "#sim sleep 5\n#sim exit 0")
    comments = []
    with requests.get(
        f"{stack.base_url}/sessions/{session_id}/stream",
        headers={"Authorization": f"Bearer {stack.token('org_a')}"},
        stream=True,
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line.startswith(b":"):
                comments.append(line)
            if line.startswith(b"event: result"):
                break

    # The test configuration sets a 2 s keepalive.
    assert comments and all(c == b": keepalive" for c in comments)


def test_stream_of_another_orgs_session_is_404(stack):
    from tests.stack import StreamRefused

    _, session_id = run(stack, "org_a", "#sim exit 0")

    with pytest.raises(StreamRefused) as refused:
        list(stack.stream(session_id, stack.token("org_b"), timeout=10))

    assert refused.value.status_code == 404


def test_delete_running_session_kills_it_with_teardown(stack):
    client, session_id = run(
        stack, "org_a", "#sim stdout started\n#sim sleep 30\n#sim stdout never"
    )
    wait_for_phase(client, session_id, {"running"})
    time.sleep(0.3)

    first = client.delete(f"/sessions/{session_id}")
    second = client.delete(f"/sessions/{session_id}")

    assert first.status_code == second.status_code == 200
    assert first.json()["phase"] == "killed"
    assert first.json()["kill_reason"] == "teardown"
    assert first.json() == second.json()
    events = list(stack.stream(session_id, stack.token("org_a"), timeout=10))
    assert events[-1].event == "result"
    assert events[-1].data["kill_reason"] == "teardown"
    assert "never\n" not in events[-1].data["stdout"]
    # The worker stops running it: its lease goes and no output follows the result.
    time.sleep(1.5)
    later = list(
        stack.stream(
            session_id, stack.token("org_a"), last_event_id=events[-1].seq, timeout=5
        )
    )
    assert later == []
    actions = [
        e["action"]
        for e in client.get(f"/sessions/{session_id}/audit").json()["events"]
    ]
    assert actions[:2] == ["session.created", "session.launched"]
    assert "session.killed" in actions and "session.torn_down" in actions


def test_timeout_kills_the_session(stack):
    client, session_id = run(stack, "org_a", "#sim sleep 10", limits={"timeout_s": 1})

    body = wait_for_phase(client, session_id, {"killed", "succeeded", "failed"})

    assert body["phase"] == "killed" and body["kill_reason"] == "timeout"


def test_output_over_the_cap_is_cut_and_killed(stack):
    client, session_id = run(
        stack, "org_a", "#sim flood 100000", limits={"output_bytes": 20000}
    )

    wait_for_phase(client, session_id, {"killed", "succeeded", "failed"})
    result = client.get(f"/sessions/{session_id}/result").json()

    assert result["kill_reason"] == "output_limit"
    assert result["output_truncated"] is True
    assert len(result["stdout"].encode()) == 20000


def test_audit_chain_of_a_finished_session(stack):
    client, session_id = run(stack, "org_a", "#sim exit 2")
    wait_for_phase(client, session_id, {"failed"})
    time.sleep(1.5)

    events = client.get(f"/sessions/{session_id}/audit").json()["events"]

    assert [e["action"] for e in events] == [
        "session.created",
        "session.launched",
        "session.finished",
        "session.torn_down",
    ]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert len({e["hash"] for e in events}) == 4
    assert events[0]["actor"] == "user_test"


def test_healthz_reports_every_dependency(stack):
    import requests

    body = requests.get(f"{stack.base_url}/healthz", timeout=5).json()

    assert body["status"] == "ok"
    assert body["database"]["ok"] and body["redis"]["ok"]
    assert body["backend"] == {
        "name": "simulator",
        "ok": True,
        "detail": body["backend"]["detail"],
    }
