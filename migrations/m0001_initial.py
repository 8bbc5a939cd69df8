"""Sessions, their event log, the insert-only audit trail, idempotency keys."""

TYPES = {
    "postgresql": {"pk": "BIGSERIAL PRIMARY KEY", "ts": "TIMESTAMP", "bool": "BOOLEAN"},
    "sqlite": {
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "ts": "DATETIME",
        "bool": "BOOLEAN",
    },
}

TABLES = """
CREATE TABLE session (
    id VARCHAR(40) PRIMARY KEY,
    org_id VARCHAR(128) NOT NULL,
    created_by VARCHAR(128) NOT NULL,
    language VARCHAR(16) NOT NULL,
    code TEXT NOT NULL,
    stdin TEXT,
    phase VARCHAR(16) NOT NULL,
    kill_reason VARCHAR(16),
    exit_code INTEGER,
    signal INTEGER,
    error TEXT,
    limits TEXT NOT NULL,
    egress TEXT NOT NULL,
    service_bindings TEXT NOT NULL,
    source TEXT,
    metadata TEXT NOT NULL,
    backend VARCHAR(32) NOT NULL,
    last_event_seq INTEGER NOT NULL DEFAULT 0,
    output_truncated {bool} NOT NULL DEFAULT FALSE,
    duration_ms INTEGER,
    created_at {ts} NOT NULL,
    started_at {ts},
    finished_at {ts},
    torn_down_at {ts}
);
CREATE INDEX session_org_created ON session (org_id, created_at DESC, id DESC);
CREATE INDEX session_phase ON session (phase);

CREATE TABLE session_event (
    id {pk},
    session_id VARCHAR(40) NOT NULL REFERENCES session (id),
    seq INTEGER NOT NULL,
    kind VARCHAR(16) NOT NULL,
    data TEXT NOT NULL,
    at {ts} NOT NULL
);
CREATE UNIQUE INDEX session_event_seq ON session_event (session_id, seq);

CREATE TABLE audit_event (
    id {pk},
    chain VARCHAR(64) NOT NULL,
    seq INTEGER NOT NULL,
    org_id VARCHAR(128) NOT NULL,
    actor VARCHAR(128) NOT NULL,
    action VARCHAR(64) NOT NULL,
    detail TEXT NOT NULL,
    at {ts} NOT NULL,
    prev_hash VARCHAR(64) NOT NULL,
    hash VARCHAR(64) NOT NULL
);
CREATE UNIQUE INDEX audit_event_chain_seq ON audit_event (chain, seq);

CREATE TABLE idempotency_key (
    id {pk},
    org_id VARCHAR(128) NOT NULL,
    key VARCHAR(255) NOT NULL,
    fingerprint VARCHAR(64) NOT NULL,
    session_id VARCHAR(40) NOT NULL REFERENCES session (id),
    created_at {ts} NOT NULL
);
CREATE UNIQUE INDEX idempotency_key_org_key ON idempotency_key (org_id, key);
"""

# The audit trail is insert-only in the database itself, so that no code path
# and no hand-written SQL statement can rewrite history.
INSERT_ONLY = {
    "postgresql": """
CREATE FUNCTION audit_event_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION USING
        MESSAGE = 'audit_event is insert-only: ' || TG_OP || ' refused',
        ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_event_no_update BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION audit_event_refuse_change();
CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_refuse_change();
""",
    "sqlite": """
CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event
BEGIN
    SELECT RAISE(ABORT, 'audit_event is insert-only: UPDATE refused');
END;
CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
BEGIN
    SELECT RAISE(ABORT, 'audit_event is insert-only: DELETE refused');
END;
""",
}


def apply(db, dialect):
    for statement in _statements(TABLES.format(**TYPES[dialect])):
        db.execute_sql(statement)
    if dialect == "postgresql":
        # The function body holds semicolons: send the triggers as one script.
        db.execute_sql(INSERT_ONLY[dialect])
    else:
        for statement in INSERT_ONLY[dialect].split("END;"):
            if statement.strip():
                db.execute_sql(statement + "END;")


def _statements(script):
    return [part.strip() for part in script.split(";") if part.strip()]
