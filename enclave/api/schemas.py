"""Marshmallow schemas of the public contract (API.md): requests and responses.

Unknown fields are refused (422), never ignored: a client that misspells
`timeout_s` must learn it, not get the default silently.
"""

from __future__ import annotations

import re

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from enclave.sessions.spec import LANGUAGES, TERMINAL_PHASES, Phase

HOST_PATTERN = re.compile(
    r"^(\*\.)?(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
MAX_METADATA_ENTRIES = 32


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class LimitsSchema(StrictSchema):
    timeout_s = fields.Float(
        validate=validate.Range(min=0.1),
        metadata={"description": "Wall-clock seconds."},
    )
    cpu_s = fields.Float(
        validate=validate.Range(min=0.1),
        metadata={"description": "CPU seconds; default: timeout_s."},
    )
    memory_mb = fields.Integer(strict=True, validate=validate.Range(min=16))
    cpus = fields.Float(validate=validate.Range(min=0.05))
    pids = fields.Integer(strict=True, validate=validate.Range(min=4))
    output_bytes = fields.Integer(
        strict=True,
        validate=validate.Range(min=0),
        metadata={"description": "stdout and stderr together."},
    )
    disk_mb = fields.Integer(
        strict=True,
        validate=validate.Range(min=1),
        metadata={"description": "Writable space."},
    )


class GitSourceSchema(StrictSchema):
    url = fields.String(
        required=True, validate=validate.URL(schemes={"https"}, require_tld=False)
    )
    ref = fields.String(load_default=None, validate=validate.Length(min=1, max=255))


class SourceSchema(StrictSchema):
    git = fields.Nested(GitSourceSchema, required=True)


class EgressSchema(StrictSchema):
    allow = fields.List(
        fields.String(validate=validate.Length(max=253)),
        load_default=list,
        validate=validate.Length(max=256),
        metadata={"description": "Host names, optionally with a leading `*.`."},
    )

    @validates("allow")
    def check_hosts(self, value, **kwargs):
        bad = [host for host in value if not HOST_PATTERN.match(host.lower())]
        if bad:
            raise ValidationError(
                f"Not host names: {', '.join(repr(h) for h in bad[:5])}."
            )


class SessionCreateSchema(StrictSchema):
    language = fields.String(required=True, validate=validate.OneOf(LANGUAGES))
    code = fields.String(required=True)
    stdin = fields.String(load_default=None, allow_none=True)
    source = fields.Nested(SourceSchema, load_default=None, allow_none=True)
    limits = fields.Nested(LimitsSchema, load_default=dict)
    egress = fields.Nested(EgressSchema, load_default=lambda: {"allow": []})
    service_bindings = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)),
        load_default=list,
        validate=validate.Length(max=32),
    )
    metadata = fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=64)),
        values=fields.String(validate=validate.Length(max=1024)),
        load_default=dict,
        validate=validate.Length(max=MAX_METADATA_ENTRIES),
    )


class IdempotencyHeaderSchema(Schema):
    class Meta:
        unknown = "exclude"

    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        load_default=None,
        validate=validate.Length(min=1, max=255),
    )


class SessionListQuerySchema(StrictSchema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(load_default=None)
    phase = fields.String(
        load_default=None, validate=validate.OneOf([p.value for p in Phase])
    )


class StreamQuerySchema(StrictSchema):
    last_event_id = fields.Integer(load_default=None, validate=validate.Range(min=0))


class SessionSchema(Schema):
    id = fields.String()
    org_id = fields.String()
    created_by = fields.String()
    language = fields.String()
    phase = fields.String(metadata={"enum": [p.value for p in Phase]})
    kill_reason = fields.String(allow_none=True)
    exit_code = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    limits = fields.Nested(LimitsSchema)
    egress = fields.Nested(EgressSchema)
    service_bindings = fields.List(fields.String())
    source = fields.Nested(SourceSchema, allow_none=True)
    metadata = fields.Dict(keys=fields.String(), values=fields.String())
    backend = fields.String()
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    torn_down_at = fields.String(allow_none=True)


class SessionListSchema(Schema):
    sessions = fields.List(fields.Nested(SessionSchema))
    next_cursor = fields.String(allow_none=True)


class EgressCountSchema(Schema):
    host = fields.String()
    allowed = fields.Boolean()
    attempts = fields.Integer()


class ResultSchema(Schema):
    session_id = fields.String()
    phase = fields.String(metadata={"enum": [p.value for p in TERMINAL_PHASES]})
    kill_reason = fields.String(allow_none=True)
    exit_code = fields.Integer(allow_none=True)
    signal = fields.Integer(
        allow_none=True,
        metadata={"description": "The signal that ended the code, if one did."},
    )
    error = fields.String(allow_none=True)
    stdout = fields.String()
    stderr = fields.String()
    output_truncated = fields.Boolean()
    duration_ms = fields.Integer(allow_none=True)
    egress = fields.List(fields.Nested(EgressCountSchema))


class AuditEventSchema(Schema):
    seq = fields.Integer()
    at = fields.String()
    actor = fields.String()
    action = fields.String()
    detail = fields.Dict()
    hash = fields.String()


class AuditSchema(Schema):
    events = fields.List(fields.Nested(AuditEventSchema))


class ComponentHealthSchema(Schema):
    ok = fields.Boolean()
    name = fields.String()
    detail = fields.String()


class HealthSchema(Schema):
    status = fields.String()
    database = fields.Nested(ComponentHealthSchema)
    redis = fields.Nested(ComponentHealthSchema)
    backend = fields.Nested(ComponentHealthSchema)
