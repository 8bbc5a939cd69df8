"""Session routes: create, list, status, result, audit, stream, teardown."""

from __future__ import annotations

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint

from enclave.api.schemas import (
    AuditSchema,
    IdempotencyHeaderSchema,
    ResultSchema,
    SessionCreateSchema,
    SessionListQuerySchema,
    SessionListSchema,
    SessionSchema,
    StreamQuerySchema,
)
from enclave.auth import SESSIONS_READ, SESSIONS_WRITE, current_principal, require_scope
from enclave.errors import ValidationFailed
from enclave.events.stream import event_stream

blp = Blueprint(
    "sessions",
    __name__,
    url_prefix="/sessions",
    description="Runs of code in sandboxes.",
)

ERRORS = (400, 401, 403, 404, 409, 413, 422, 429, 503)


def orchestrator():
    return current_app.extensions["enclave"].orchestrator


@blp.route("")
class Sessions(MethodView):
    @require_scope(SESSIONS_WRITE)
    @blp.arguments(SessionCreateSchema)
    @blp.arguments(IdempotencyHeaderSchema, location="headers", as_kwargs=True)
    @blp.response(
        201, SessionSchema, headers={"Location": {"schema": {"type": "string"}}}
    )
    @blp.alt_response(
        200,
        schema=SessionSchema,
        description="A replay of an earlier call with the same Idempotency-Key.",
    )
    def post(self, body, idempotency_key=None):
        """Create a session and queue it to run"""
        view, created = orchestrator().create_session(
            current_principal(), body, idempotency_key
        )
        return view, 201 if created else 200, {"Location": f"/sessions/{view['id']}"}

    @require_scope(SESSIONS_READ)
    @blp.arguments(SessionListQuerySchema, location="query")
    @blp.response(200, SessionListSchema)
    def get(self, query):
        """List the organisation's sessions, newest first"""
        return orchestrator().list_sessions(current_principal(), **query)


@blp.route("/<string:session_id>")
class SessionById(MethodView):
    @require_scope(SESSIONS_READ)
    @blp.response(200, SessionSchema)
    def get(self, session_id):
        """Show a session's status"""
        return orchestrator().get_session(current_principal(), session_id)

    @require_scope(SESSIONS_WRITE)
    @blp.response(200, SessionSchema)
    def delete(self, session_id):
        """Stop a session if it still runs, and reclaim its resources"""
        return orchestrator().teardown(current_principal(), session_id)


@blp.route("/<string:session_id>/result")
@require_scope(SESSIONS_READ)
@blp.response(200, ResultSchema)
def session_result(session_id):
    """Show a finished session's result"""
    return orchestrator().get_result(current_principal(), session_id)


@blp.route("/<string:session_id>/audit")
@require_scope(SESSIONS_READ)
@blp.response(200, AuditSchema)
def session_audit(session_id):
    """Show a session's audit trail"""
    return orchestrator().get_audit(current_principal(), session_id)


@blp.route("/<string:session_id>/stream")
@require_scope(SESSIONS_READ)
@blp.arguments(StreamQuerySchema, location="query")
@blp.response(
    200,
    description="`text/event-stream` of phase, stdout, stderr, egress and result events.",
)
def session_stream(query, session_id):
    """Follow a session's events live, after replaying earlier ones"""
    session = orchestrator().stream_position(current_principal(), session_id)
    after = _last_event_id(query)
    extension = current_app.extensions["enclave"]
    body = event_stream(
        extension.relay,
        session.id,
        after=after,
        keepalive_s=extension.settings.sse_keepalive_s,
    )
    return Response(
        body,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _last_event_id(query) -> int:
    header = request.headers.get("Last-Event-ID")
    if header is None:
        return query["last_event_id"] or 0
    try:
        value = int(header)
    except ValueError:
        value = -1
    if value < 0:
        raise ValidationFailed(
            "Last-Event-ID must be a non-negative event number.",
            errors={"headers": {"Last-Event-ID": ["Not a non-negative integer."]}},
        )
    return value
