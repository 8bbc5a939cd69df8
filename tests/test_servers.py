"""Tests of the suite's own machinery: the throwaway servers and `ServiceStack`.

The servers are exercised for real. `ServiceStack` is exercised with small
stand-in programs in place of the service's entry points, which is enough to
prove what the stack itself promises: the environment it hands down, log
capture, health polling, signalling one worker, the event-stream client and a
stop that leaves no process behind.
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import time

import jwt
import psycopg2
import pytest
import redis
from playhouse.db_url import connect

from tests.servers import (
    PostgresServer,
    RedisServer,
    ServerError,
    free_port,
    redis_url_with_db,
)
from tests.stack import (
    STACK_MARKER,
    ServiceStack,
    StackError,
    StreamRefused,
    _pids_with_environment_entry,
    parse_sse,
)


def _query(url, *statements, parameters=None):
    """Run statements in one transaction; the last one's first row."""
    connection = psycopg2.connect(url)
    try:
        with connection, connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement, parameters)
            return cursor.fetchone()
    finally:
        connection.close()


def test_postgres_url_accepts_query(postgres_url):
    total, version = _query(
        postgres_url,
        "CREATE TEMPORARY TABLE probe (n integer)",
        "INSERT INTO probe VALUES (20), (22)",
        "SELECT sum(n), current_setting('server_version_num') FROM probe",
    )

    assert total == 42
    assert int(version) >= 150000


def test_fresh_postgres_url_is_new_and_empty(postgres_url, fresh_postgres_url):
    (tables,) = _query(
        fresh_postgres_url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )

    assert fresh_postgres_url != postgres_url
    assert tables == 0


def test_postgres_server_drop_database_removes_it(postgres_server, postgres_url):
    name = postgres_server.create_database()
    held_open = psycopg2.connect(postgres_server.url_for(name))

    # A connection left open must not keep the database alive.
    postgres_server.drop_database(name)
    (left,) = _query(
        postgres_url,
        "SELECT count(*) FROM pg_database WHERE datname = %s",
        parameters=(name,),
    )

    held_open.close()
    assert left == 0


def test_postgres_server_missing_binaries_fail_clearly(tmp_path):
    server = PostgresServer(bindir=tmp_path / "nowhere")

    with pytest.raises(ServerError, match="initdb is missing.*postgresql-15"):
        server.start()
    server.stop()


def test_redis_url_answers_ping(redis_url):
    client = redis.Redis.from_url(redis_url)

    assert client.ping() is True
    assert client.config_get("save")["save"] == ""
    client.close()


@pytest.mark.parametrize("run", ["first", "second"])
def test_redis_client_starts_empty(redis_client, run):
    # Whichever run comes second finds the key the other left, unless the
    # fixture flushed the database in between.
    assert redis_client.dbsize() == 0
    redis_client.set("left-by-a-test", run)


def test_redis_server_port_taken_fails_with_log(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = RedisServer(port=squatter.getsockname()[1])

        with pytest.raises(ServerError, match="(?s)exited.*[Aa]ddress already in use"):
            server.start(timeout=10)
    server.stop()


def test_redis_server_missing_binary_fails_clearly(tmp_path):
    server = RedisServer(binary=tmp_path / "redis-server")

    with pytest.raises(ServerError, match="redis-server is missing"):
        server.start()


def test_redis_url_with_db_keeps_server():
    assert redis_url_with_db("redis://:pw@10.0.0.1:6380/0", 7) == (
        "redis://:pw@10.0.0.1:6380/7"
    )


def test_sqlite_url_works(sqlite_url, tmp_path):
    database = connect(sqlite_url)
    database.execute_sql("CREATE TABLE probe (n INTEGER)")
    database.execute_sql("INSERT INTO probe VALUES (42)")
    (value,) = database.execute_sql("SELECT n FROM probe").fetchone()
    database.close()

    assert value == 42
    assert (tmp_path / "enclave.db").is_file()


def test_any_database_url_is_writable(any_database_url):
    database = connect(any_database_url)
    database.execute_sql("CREATE TABLE probe (n INTEGER)")
    database.execute_sql("INSERT INTO probe VALUES (7)")
    (value,) = database.execute_sql("SELECT n FROM probe").fetchone()
    database.close()

    assert value == 7


def test_free_port_is_bindable():
    port = free_port()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


SAMPLE_STREAM = (
    b"\xef\xbb\xbf: keepalive\r\n"
    b"\r\n"
    b"id: 1\r\n"
    b"event: phase\r\n"
    b'data: {"phase": "running",\r\n'
    b'data:  "kill_reason": null}\r\n'
    b"\r\n"
    b"retry: 1000\n"
    b"event: stdout\n"
    b'data: {"data": "caf\xc3\xa9\\n"}\n'
    b"\n"
    b"id: 3\r"
    b"event: ignored\r"
    b"\r"
    b"id: 4\n"
    b"event: result\n"
    b'data:{"exit_code": 0}\n'
    b"\n"
    b"event: unterminated\n"
    b'data: {"lost": true}\n'
)


def _events(chunks):
    return [(e.id, e.event, e.data) for e in parse_sse(chunks)]


def test_parse_sse_reads_fields_comments_and_line_endings():
    assert _events([SAMPLE_STREAM]) == [
        ("1", "phase", {"phase": "running", "kill_reason": None}),
        ("1", "stdout", {"data": "café\n"}),
        ("4", "result", {"exit_code": 0}),
    ]


def test_parse_sse_same_events_however_split():
    whole = _events([SAMPLE_STREAM])

    one_byte_at_a_time = _events(
        SAMPLE_STREAM[i : i + 1] for i in range(len(SAMPLE_STREAM))
    )
    uneven = _events(SAMPLE_STREAM[i : i + 7] for i in range(0, len(SAMPLE_STREAM), 7))

    assert one_byte_at_a_time == whole
    assert uneven == whole


def test_parse_sse_rejects_data_that_is_not_json():
    with pytest.raises(ValueError, match="not JSON"):
        list(parse_sse([b"event: stdout\ndata: hello\n\n"]))


def test_service_stack_token_round_trip(tmp_path):
    stack = ServiceStack(
        database_url="sqlite://", redis_url="redis://x/1", workdir=tmp_path
    )

    token = stack.token("org_a", scopes=["sessions:read"], sub="user_1", ttl=60)
    claims = jwt.decode(token, stack.jwt_secret, algorithms=["HS256"])

    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert claims["sub"] == "user_1"
    assert claims["org_id"] == "org_a"
    assert claims["scope"] == "sessions:read"
    assert 55 <= claims["exp"] - time.time() <= 61
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            token, "another secret of enough length, really", algorithms=["HS256"]
        )


def test_service_stack_environment_is_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCLAVE_AUTH_DISABLED", "1")
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    one = ServiceStack(
        database_url="sqlite:///one.db",
        redis_url="redis://127.0.0.1:1/3",
        workdir=tmp_path / "one",
        env={"ENCLAVE_SIMULATOR_STEP_S": 0.01, "PATH": None},
    )
    two = ServiceStack(
        database_url="sqlite:///two.db",
        redis_url="redis://127.0.0.1:1/4",
        workdir=tmp_path / "two",
    )

    assert one.env["ENCLAVE_ENV"] == "test"
    assert one.env["ENCLAVE_DATABASE_URL"] == "sqlite:///one.db"
    assert one.env["ENCLAVE_REDIS_URL"] == "redis://127.0.0.1:1/3"
    assert one.env["ENCLAVE_BACKEND"] == "simulator"
    assert one.env["ENCLAVE_JWT_SECRET"] == one.jwt_secret
    assert len(one.jwt_secret) >= 64
    assert one.env["ENCLAVE_STATE_DIR"] == str(tmp_path / "one" / "state")
    assert one.env["ENCLAVE_SIMULATOR_STEP_S"] == "0.01"
    assert "PATH" not in one.env
    assert "ENCLAVE_AUTH_DISABLED" not in one.env
    assert "DATABASE_URL" not in one.env
    assert one.queue_name != two.queue_name
    assert one.jwt_secret != two.jwt_secret
    assert one.base_url != two.base_url


STANDIN_MIGRATE = "print('migrations applied')\n"

STANDIN_WEB = textwrap.dedent(
    """
    import json, os, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import jwt

    SECRET = os.environ["ENCLAVE_JWT_SECRET"]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                return self.answer(200, {"status": "ok"})
            try:
                token = self.headers["Authorization"].removeprefix("Bearer ")
                claims = jwt.decode(token, SECRET, algorithms=["HS256"])
            except Exception:
                return self.answer(401, {"code": 401})
            after = int(self.headers.get("Last-Event-ID") or 0)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for seq in range(after + 1, 4):
                data = json.dumps({"seq": seq, "org_id": claims["org_id"]})
                self.wfile.write(b": keepalive\\n\\n")
                self.wfile.write(f"id: {seq}\\nevent: stdout\\ndata: {data}\\n\\n".encode())
                self.wfile.flush()
                time.sleep(0.05)

        def answer(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

    print("web listening", flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
    """
)

# A worker that, like RQ's, runs its job in a child that leaves the
# worker's process session: only the marker sweep can reach that child.
STANDIN_WORKER = textwrap.dedent(
    """
    import os, time
    if os.fork() == 0:
        os.setsid()
        time.sleep(600)
        os._exit(0)
    print("worker up on", os.environ["ENCLAVE_QUEUE_NAME"], flush=True)
    time.sleep(600)
    """
)

STANDIN_REAPER = "import time\nprint('reaper up', flush=True)\ntime.sleep(600)\n"


def _standin_stack(tmp_path, migrate=STANDIN_MIGRATE, **options) -> ServiceStack:
    scripts = tmp_path / "bin"
    scripts.mkdir()
    stack = ServiceStack(
        database_url="sqlite:///unused.db",
        redis_url="redis://127.0.0.1:1/1",
        workdir=tmp_path / "stack",
        **options,
    )
    for role, source in [
        ("migrate", migrate),
        ("web", STANDIN_WEB),
        ("worker", STANDIN_WORKER),
        ("reaper", STANDIN_REAPER),
    ]:
        path = scripts / f"{role}.py"
        path.write_text(source)
        setattr(stack, f"{role}_command", (sys.executable, str(path)))
    return stack


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_service_stack_runs_and_stops_every_process(tmp_path):
    stack = _standin_stack(tmp_path, workers=3)
    marker = f"{STACK_MARKER}={stack.stack_id}".encode()
    try:
        stack.start()
        health = stack.wait_healthy(timeout=20)
        # Three workers and their three job children, the web and the reaper.
        _wait_for(lambda: len(list(_pids_with_environment_entry(marker))) == 8)
        _wait_for(lambda: stack.logs().count("worker up on") == 3)
    finally:
        stack.stop()

    assert health == {"status": "ok"}
    logs = stack.logs()
    assert "migrations applied" in logs
    assert "web listening" in logs
    assert "reaper up" in logs
    assert f"worker up on {stack.queue_name}" in logs
    assert list(_pids_with_environment_entry(marker)) == []


def test_service_stack_kill_worker_ends_only_that_worker(tmp_path):
    stack = _standin_stack(tmp_path, workers=2, reaper=False)
    try:
        stack.start()
        stack.wait_healthy(timeout=20)

        status = stack.kill_worker(0, signal.SIGKILL)
        added = stack.start_worker()

        assert status == -signal.SIGKILL
        assert stack.workers[1].popen.poll() is None
        assert added == 2
        stack.wait_healthy(timeout=5)
        _wait_for(
            lambda: "worker up on" in (stack.log_dir / "worker-2.log").read_text()
        )
    finally:
        stack.stop()


def test_service_stack_failed_migrations_stop_the_start(tmp_path):
    stack = _standin_stack(
        tmp_path,
        migrate="import sys\nprint('relation missing')\nsys.exit(3)\n",
    )

    with pytest.raises(
        StackError, match="(?s)migrations exited with 3.*relation missing"
    ):
        stack.start()
    assert stack.web is None


def test_service_stack_stream_yields_events_after_last_id(tmp_path):
    stack = _standin_stack(tmp_path, workers=0, reaper=False)
    try:
        stack.start()
        stack.wait_healthy(timeout=20)
        token = stack.token("org_a")

        everything = list(stack.stream("ses_1", token, timeout=10))
        later = list(stack.stream("ses_1", token, last_event_id=1, timeout=10))
        with pytest.raises(StreamRefused) as refused:
            list(stack.stream("ses_1", "not-a-token", timeout=10))
    finally:
        stack.stop()

    assert [(e.seq, e.event) for e in everything] == [
        (1, "stdout"),
        (2, "stdout"),
        (3, "stdout"),
    ]
    assert everything[0].data == {"seq": 1, "org_id": "org_a"}
    assert [e.seq for e in later] == [2, 3]
    assert refused.value.status_code == 401


def test_service_stack_client_prefixes_base_url_and_bearer(tmp_path):
    stack = _standin_stack(tmp_path, workers=0, reaper=False)
    try:
        stack.start()
        stack.wait_healthy(timeout=20)
        with stack.client(stack.token("org_a")) as client:
            streamed = client.get("/sessions/ses_2/stream")
        with stack.client() as anonymous:
            refused = anonymous.get("/sessions/ses_2/stream")
    finally:
        stack.stop()

    assert streamed.status_code == 200
    assert '"org_id": "org_a"' in streamed.text
    assert refused.status_code == 401


def test_service_stack_wait_healthy_reports_a_dead_web(tmp_path):
    stack = _standin_stack(tmp_path, workers=0, reaper=False)
    stack.web_command = (
        sys.executable,
        "-c",
        "print('cannot bind'); raise SystemExit(4)",
    )
    try:
        stack.start()
        with pytest.raises(StackError, match="(?s)web exited with 4.*cannot bind"):
            stack.wait_healthy(timeout=20)
    finally:
        stack.stop()


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_stack_factory_starts_a_healthy_service(stack_factory, redis_client, database):
    stack = stack_factory(database=database, workers=1)
    health = stack.wait_healthy(timeout=30)
    marker = f"{STACK_MARKER}={stack.stack_id}".encode()
    running = list(_pids_with_environment_entry(marker))

    stack.stop()

    expected = "sqlite" if database == "sqlite" else "postgres"
    assert health["status"] == "ok"
    assert expected in health["database"]["name"], health
    stack_db = redis.Redis.from_url(stack.redis_url).connection_pool.connection_kwargs
    assert stack_db["db"] != redis_client.connection_pool.connection_kwargs["db"]
    # The web (master and its workers), one worker and the reaper.
    assert len(running) >= 3, stack.log_tails()
    assert list(_pids_with_environment_entry(marker)) == []
    assert stack.jwt_secret not in stack.logs(), "the JWT secret is in a log"
