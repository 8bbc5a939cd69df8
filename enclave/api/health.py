"""Liveness: `GET /healthz`, without authentication."""

from __future__ import annotations

import logging

import redis
from flask import current_app
from flask_smorest import Blueprint

from enclave.api.schemas import HealthSchema
from enclave.db import database, dialect

logger = logging.getLogger(__name__)

blp = Blueprint("health", __name__, description="Service health.")


@blp.route("/healthz")
@blp.response(200, HealthSchema)
@blp.alt_response(503, schema=HealthSchema, description="A dependency is down.")
def healthz():
    """Report whether the database, Redis and the backend answer"""
    extension = current_app.extensions["enclave"]
    report = {
        "database": _check_database(),
        "redis": _check_redis(extension.redis),
        "backend": _check_backend(extension.backend),
    }
    ok = all(part["ok"] for part in report.values())
    report["status"] = "ok" if ok else "unavailable"
    return report, 200 if ok else 503


def _check_database() -> dict:
    try:
        database.execute_sql("SELECT 1").fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means "down", reported not raised
        logger.warning("health: database down: %s", type(exc).__name__)
        return {"ok": False, "name": dialect(), "detail": type(exc).__name__}
    return {"ok": True, "name": dialect(), "detail": ""}


def _check_redis(client: redis.Redis) -> dict:
    try:
        client.ping()
    except redis.RedisError as exc:
        logger.warning("health: redis down: %s", type(exc).__name__)
        return {"ok": False, "name": "redis", "detail": type(exc).__name__}
    return {"ok": True, "name": "redis", "detail": ""}


def _check_backend(backend) -> dict:
    try:
        health = backend.health()
    except Exception as exc:  # noqa: BLE001 - a probe that raises is a failed probe
        logger.warning("health: backend probe failed: %s", type(exc).__name__)
        return {"ok": False, "name": backend.name, "detail": type(exc).__name__}
    return {"ok": health.ok, "name": backend.name, "detail": health.detail}
