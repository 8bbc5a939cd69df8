"""Applies the migrations in `migrations/` that a database has not seen yet.

Run by the `release` process (`python -m enclave migrate`) before new code
serves. On PostgreSQL an advisory lock keeps two releases from migrating at
once; each migration commits together with its `schema_migration` row.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import migrations
from enclave.db import database, dialect
from enclave.models import SchemaMigration

logger = logging.getLogger(__name__)

ADVISORY_LOCK_ID = 0x656E636C  # arbitrary, stable: "encl"


def available_migrations() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules(migrations.__path__)
        if info.name.startswith("m")
    )


def migrate() -> list[str]:
    """Apply pending migrations in order; return the names applied."""
    applied_now = []
    kind = dialect()
    with database.connection_context():
        if kind == "postgresql":
            database.execute_sql("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_ID,))
        try:
            database.create_tables([SchemaMigration], safe=True)
            done = {row.name for row in SchemaMigration.select()}
            for name in available_migrations():
                if name in done:
                    continue
                module = importlib.import_module(f"migrations.{name}")
                with database.atomic():
                    module.apply(database, kind)
                    SchemaMigration.create(name=name)
                logger.info("migration applied name=%s dialect=%s", name, kind)
                applied_now.append(name)
        finally:
            if kind == "postgresql":
                database.execute_sql(
                    "SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_ID,)
                )
    return applied_now


def pending_migrations() -> list[str]:
    with database.connection_context():
        if not database.table_exists("schema_migration"):
            return available_migrations()
        done = {row.name for row in SchemaMigration.select()}
    return [name for name in available_migrations() if name not in done]
