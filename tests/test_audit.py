"""The audit trail is insert-only in the database, and its hash chain holds."""

from __future__ import annotations

import peewee
import pytest

from enclave import audit, schema
from enclave.db import configure_database, database, dialect
from enclave.models import AuditEvent
from tests.concurrency import run_concurrently


@pytest.fixture
def db(any_database_url):
    configure_database(any_database_url)
    schema.migrate()
    with database.connection_context():
        yield database


def fill_chain(chain="ses_1", rows=3):
    for i in range(rows):
        audit.record(
            chain, org_id="org_a", actor="user_1", action=f"step.{i}", detail={"i": i}
        )


def test_audit_update_is_refused_by_the_database(db):
    fill_chain()

    with pytest.raises(
        (
            peewee.IntegrityError,
            peewee.OperationalError,
            peewee.InternalError,
            peewee.ProgrammingError,
        )
    ) as refused:
        with db.atomic():
            db.execute_sql("UPDATE audit_event SET action = 'rewritten' WHERE seq = 2")

    assert "insert-only" in str(refused.value)
    assert [e.action for e in audit.events("ses_1")] == ["step.0", "step.1", "step.2"]


def test_audit_delete_is_refused_by_the_database(db):
    fill_chain()

    with pytest.raises(peewee.DatabaseError) as refused:
        with db.atomic():
            db.execute_sql("DELETE FROM audit_event")

    assert "insert-only" in str(refused.value)
    assert len(audit.events("ses_1")) == 3


def test_audit_model_update_is_refused_too(db):
    fill_chain()

    with pytest.raises(peewee.DatabaseError):
        with db.atomic():
            AuditEvent.update(actor="someone else").execute()


def test_audit_truncate_is_refused_on_postgresql(db):
    if dialect() != "postgresql":
        # SQLite has no TRUNCATE; DELETE is what it would use, refused above.
        assert dialect() == "sqlite"
        return
    fill_chain()

    with pytest.raises(peewee.DatabaseError):
        with db.atomic():
            db.execute_sql("TRUNCATE audit_event")

    assert len(audit.events("ses_1")) == 3


def test_hash_chain_verifies(db):
    fill_chain(rows=5)
    fill_chain(chain="ses_2", rows=2)

    check = audit.verify_chain("ses_1")

    assert check.ok and check.rows == 5
    assert audit.verify_chain("ses_2").ok
    rows = audit.events("ses_1")
    assert rows[0].prev_hash == audit.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:]))


def test_hash_chain_detects_an_edited_row(db):
    fill_chain(rows=4)
    # Someone with DDL rights removes the guard and rewrites history.
    if dialect() == "postgresql":
        db.execute_sql("ALTER TABLE audit_event DISABLE TRIGGER USER")
    else:
        db.execute_sql("DROP TRIGGER audit_event_no_update")
    db.execute_sql(
        "UPDATE audit_event SET detail = '{\"i\": 99}' WHERE chain = 'ses_1' AND seq = 3"
    )

    check = audit.verify_chain("ses_1")

    assert not check.ok
    assert check.broken_at == 3


def test_hash_chain_detects_a_removed_row(db):
    fill_chain(rows=4)
    if dialect() == "postgresql":
        db.execute_sql("ALTER TABLE audit_event DISABLE TRIGGER USER")
    else:
        db.execute_sql("DROP TRIGGER audit_event_no_delete")
    db.execute_sql("DELETE FROM audit_event WHERE chain = 'ses_1' AND seq = 2")

    check = audit.verify_chain("ses_1")

    assert not check.ok and check.broken_at == 3


def test_concurrent_records_keep_one_unbroken_chain(any_database_url):
    configure_database(any_database_url)
    schema.migrate()

    def writer(n):
        with database.connection_context():
            for i in range(10):
                audit.record(
                    "ses_c",
                    org_id="org_a",
                    actor=f"w{n}",
                    action="tick",
                    detail={"i": i},
                )

    errors = run_concurrently(writer, 4)

    assert errors == []
    with database.connection_context():
        check = audit.verify_chain("ses_c")
    assert check.ok and check.rows == 40
