"""Peewee models: sessions, their numbered event log, the audit trail.

The schema itself is created and changed only by `migrations/`; these classes
map onto it. `AuditEvent` rows can only be inserted: the database refuses
UPDATE and DELETE on that table with triggers.
"""

from __future__ import annotations

import datetime as dt
import json

import peewee

from enclave.db import database


def utcnow() -> dt.datetime:
    """Naive UTC, the form every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class JSONField(peewee.TextField):
    """JSON stored as text, so that PostgreSQL and SQLite hold it alike."""

    def db_value(self, value):
        return (
            None
            if value is None
            else json.dumps(value, separators=(",", ":"), sort_keys=True)
        )

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Session(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=40)
    org_id = peewee.CharField(max_length=128)
    created_by = peewee.CharField(max_length=128)
    language = peewee.CharField(max_length=16)
    code = peewee.TextField()
    stdin = peewee.TextField(null=True)
    phase = peewee.CharField(max_length=16)
    kill_reason = peewee.CharField(max_length=16, null=True)
    exit_code = peewee.IntegerField(null=True)
    signal = peewee.IntegerField(null=True)
    error = peewee.TextField(null=True)
    limits = JSONField()
    egress = JSONField()
    service_bindings = JSONField()
    source = JSONField(null=True)
    metadata = JSONField()
    backend = peewee.CharField(max_length=32)
    last_event_seq = peewee.IntegerField(default=0)
    output_truncated = peewee.BooleanField(default=False)
    duration_ms = peewee.IntegerField(null=True)
    created_at = peewee.DateTimeField(default=utcnow)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)
    torn_down_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "session"


class SessionEvent(BaseModel):
    """One numbered event of a session: the log behind SSE replay and results."""

    id = peewee.BigAutoField()
    session_id = peewee.CharField(max_length=40)
    seq = peewee.IntegerField()
    kind = peewee.CharField(max_length=16)
    data = JSONField()
    at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "session_event"


class AuditEvent(BaseModel):
    """One insert-only audit row; `hash` chains the previous row of its chain."""

    id = peewee.BigAutoField()
    chain = peewee.CharField(max_length=64)
    seq = peewee.IntegerField()
    org_id = peewee.CharField(max_length=128)
    actor = peewee.CharField(max_length=128)
    action = peewee.CharField(max_length=64)
    detail = JSONField()
    at = peewee.DateTimeField(default=utcnow)
    prev_hash = peewee.CharField(max_length=64)
    hash = peewee.CharField(max_length=64)

    class Meta:
        table_name = "audit_event"


class IdempotencyKey(BaseModel):
    """Maps an org's `Idempotency-Key` to the session its first request created."""

    id = peewee.BigAutoField()
    org_id = peewee.CharField(max_length=128)
    key = peewee.CharField(max_length=255)
    fingerprint = peewee.CharField(max_length=64)
    session_id = peewee.CharField(max_length=40)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "idempotency_key"


class SchemaMigration(BaseModel):
    name = peewee.CharField(primary_key=True, max_length=128)
    applied_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        table_name = "schema_migration"


def rfc3339(value: dt.datetime | None) -> str | None:
    """`2026-12-03T15:35:12.123Z`: the API's one timestamp format."""
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
