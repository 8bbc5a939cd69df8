"""The insert-only, hash-chained audit trail.

Every row belongs to a chain (a session's id, or `org:<org_id>` for what
happens before a session exists) and is numbered within it. Its hash covers
its own fields and the previous row's hash, so an edited, removed or inserted
row breaks every hash after it. The database refuses UPDATE and DELETE on the
table (see `migrations/m0001_initial.py`); `verify_chain` proves the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import peewee

from enclave.db import database, dialect, write_transaction
from enclave.models import AuditEvent, utcnow

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_INSERT_ATTEMPTS = 5


def row_hash(
    *,
    prev_hash: str,
    chain: str,
    seq: int,
    org_id: str,
    actor: str,
    action: str,
    detail: dict[str, Any],
    at,
) -> str:
    body = json.dumps(
        {
            "prev_hash": prev_hash,
            "chain": chain,
            "seq": seq,
            "org_id": org_id,
            "actor": actor,
            "action": action,
            "detail": detail,
            "at": at.isoformat(timespec="microseconds"),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def record(
    chain: str,
    *,
    org_id: str,
    actor: str,
    action: str,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one row to `chain`; concurrent writers retry on the next number."""
    detail = detail or {}
    for attempt in range(_INSERT_ATTEMPTS):
        try:
            with write_transaction():
                _lock_chain(chain)
                last = (
                    AuditEvent.select(AuditEvent.seq, AuditEvent.hash)
                    .where(AuditEvent.chain == chain)
                    .order_by(AuditEvent.seq.desc())
                    .first()
                )
                seq = last.seq + 1 if last else 1
                prev_hash = last.hash if last else GENESIS_HASH
                at = utcnow()
                fields = dict(
                    chain=chain,
                    seq=seq,
                    org_id=org_id,
                    actor=actor,
                    action=action,
                    detail=detail,
                    at=at,
                )
                event = AuditEvent.create(
                    **fields,
                    prev_hash=prev_hash,
                    hash=row_hash(prev_hash=prev_hash, **fields),
                )
        except peewee.IntegrityError:
            # Another writer took this number first; read the new tail and retry.
            logger.debug("audit seq race chain=%s attempt=%s", chain, attempt)
            continue
        logger.debug("audit recorded chain=%s seq=%s action=%s", chain, seq, action)
        return event
    raise RuntimeError(
        f"could not append to audit chain {chain} after {_INSERT_ATTEMPTS} tries"
    )


def _lock_chain(chain: str) -> None:
    """Serialise writers of one chain until the transaction ends.

    PostgreSQL takes a transaction-scoped advisory lock on the chain's name.
    SQLite needs nothing: it admits one writer at a time, and the unique
    (chain, seq) index catches the rest.
    """
    if dialect() == "postgresql":
        database.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (chain,))


def events(chain: str) -> list[AuditEvent]:
    return list(
        AuditEvent.select().where(AuditEvent.chain == chain).order_by(AuditEvent.seq)
    )


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    rows: int
    broken_at: int | None = None
    problem: str | None = None


def verify_chain(chain: str) -> ChainCheck:
    """Recompute every hash of `chain`; report the first row that does not fit."""
    prev_hash = GENESIS_HASH
    rows = events(chain)
    for expected_seq, row in enumerate(rows, start=1):
        if row.seq != expected_seq:
            return ChainCheck(False, len(rows), row.seq, f"expected seq {expected_seq}")
        if row.prev_hash != prev_hash:
            return ChainCheck(False, len(rows), row.seq, "prev_hash does not match")
        computed = row_hash(
            prev_hash=row.prev_hash,
            chain=row.chain,
            seq=row.seq,
            org_id=row.org_id,
            actor=row.actor,
            action=row.action,
            detail=row.detail,
            at=row.at,
        )
        if computed != row.hash:
            return ChainCheck(False, len(rows), row.seq, "hash does not match the row")
        prev_hash = row.hash
    return ChainCheck(True, len(rows))
