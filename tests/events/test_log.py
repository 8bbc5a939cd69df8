"""Event numbering: per session, without gaps, and closed after a terminal phase."""

from __future__ import annotations

import json
import time

import pytest

from enclave import schema
from enclave.db import configure_database, database
from enclave.events.log import append_events, stored_events
from enclave.events.sink import SessionSink
from enclave.models import Session
from enclave.sessions import lifecycle
from enclave.sessions.spec import KillReason, Phase, SessionResult
from tests.concurrency import run_concurrently


@pytest.fixture
def db(any_database_url):
    configure_database(any_database_url)
    schema.migrate()
    with database.connection_context():
        yield database


def make_session(session_id="ses_1", phase="running"):
    return Session.create(
        id=session_id,
        org_id="org_a",
        created_by="user_1",
        language="python",
        code="pass",
        phase=phase,
        limits={},
        egress={"allow": []},
        service_bindings=[],
        metadata={},
        backend="simulator",
    )


def test_concurrent_writers_number_events_without_gaps(db, redis_client):
    make_session()

    def writer(n):
        with database.connection_context():
            for i in range(15):
                append_events("ses_1", [("stdout", {"data": f"{n}:{i}"})])

    errors = run_concurrently(writer, 4)

    assert errors == []
    events = stored_events("ses_1")
    assert [e.seq for e in events] == list(range(1, 61))
    assert Session.get_by_id("ses_1").last_event_seq == 60


def test_nothing_is_appended_after_a_terminal_phase(db, redis_client):
    make_session()
    lifecycle.finish_session(
        redis_client, "ses_1", SessionResult.exited(0), actor="worker"
    )

    late = append_events("ses_1", [("stdout", {"data": "too late"})])

    assert late is None
    assert [e.kind for e in stored_events("ses_1")] == ["phase", "result"]


def test_first_terminal_phase_wins(db, redis_client):
    make_session()

    first = lifecycle.finish_session(
        redis_client, "ses_1", SessionResult.killed(KillReason.TEARDOWN), actor="user_1"
    )
    second = lifecycle.finish_session(
        redis_client, "ses_1", SessionResult.exited(0), actor="worker"
    )

    assert (first, second) == (True, False)
    session = Session.get_by_id("ses_1")
    assert session.phase == "killed" and session.kill_reason == "teardown"
    assert [e.kind for e in stored_events("ses_1")].count("result") == 1


def test_phases_only_move_forward(db, redis_client):
    make_session(phase="queued")

    assert lifecycle.advance_phase(redis_client, "ses_1", Phase.RUNNING)
    assert not lifecycle.advance_phase(redis_client, "ses_1", Phase.PROVISIONING)
    assert Session.get_by_id("ses_1").phase == "running"


def test_sink_cuts_output_at_the_cap_on_a_character_boundary(db, redis_client):
    make_session()
    sink = SessionSink(redis_client, "ses_1", org_id="org_a", output_bytes=10)

    assert sink.stdout("abcd") is True
    assert sink.stderr("éééé") is False  # 8 bytes into 6 bytes of room
    assert sink.stdout("more") is False
    sink.result(SessionResult.killed(KillReason.OUTPUT_LIMIT))

    result = lifecycle.stored_result("ses_1")
    assert result["stdout"] == "abcd"
    assert result["stderr"] == "ééé"
    assert len((result["stdout"] + result["stderr"]).encode()) == 10
    assert result["output_truncated"] is True


def test_sink_publishes_each_stored_event(db, redis_client):
    make_session()
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("enclave:events:ses_1")
    sink = SessionSink(redis_client, "ses_1", org_id="org_a", output_bytes=100)

    sink.stdout("hi")
    sink.result(SessionResult.exited(1))

    messages = []
    deadline = time.monotonic() + 5
    while len(messages) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            messages.append(message)

    published = [json.loads(m["data"]) for m in messages]
    assert [(p["seq"], p["event"]) for p in published] == [
        (1, "stdout"),
        (2, "phase"),
        (3, "result"),
    ]
    assert published[2]["data"]["exit_code"] == 1
