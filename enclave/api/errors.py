"""The one place where errors become responses.

Every error leaves as the JSON shape of the contract,
`{"code", "status", "message", "type", "errors"?}`: the project's own
`EnclaveError`s, Werkzeug's HTTP errors (404 for an unknown route, 405, 413,
flask-smorest's 422 with field errors), a database or Redis that went away
(503), and anything unexpected (500, logged with its traceback, never sent).
"""

from __future__ import annotations

import logging

import redis
from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from enclave.db import is_database_error
from enclave.errors import DependencyUnavailable, EnclaveError, PayloadTooLarge

logger = logging.getLogger(__name__)

HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "quota_exceeded",
}


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(EnclaveError, _enclave_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def error_response(error: EnclaveError):
    response = jsonify(error.to_dict())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _enclave_error(error: EnclaveError):
    if error.status >= 500:
        logger.error(
            "request failed type=%s", error.type, exc_info=error.__cause__ is not None
        )
    return error_response(error)


def _http_error(error: HTTPException):
    status = error.code or 500
    if status == 413:
        return error_response(
            PayloadTooLarge("The request body is over the size limit.")
        )
    converted = EnclaveError(_message(error))
    converted.status = status
    converted.type = HTTP_TYPES.get(status, "http_error")
    # flask-smorest puts field errors, by location, on the exception's data.
    data = getattr(error, "data", None) or {}
    if isinstance(data.get("messages"), dict):
        converted.errors = data["messages"]
    if status == 405 and error.valid_methods:
        converted.headers["Allow"] = ", ".join(error.valid_methods)
    return error_response(converted)


def _unexpected_error(error: Exception):
    if isinstance(error, redis.RedisError) or is_database_error(error):
        logger.error(
            "dependency unavailable: %s request_id=%s",
            type(error).__name__,
            g.get("request_id"),
            exc_info=True,
        )
        return error_response(
            DependencyUnavailable("A service this call needs is unavailable.")
        )
    logger.error("unhandled error request_id=%s", g.get("request_id"), exc_info=True)
    converted = EnclaveError("The server failed to handle this request.")
    return error_response(converted)


def _message(error: HTTPException) -> str:
    data = getattr(error, "data", None) or {}
    if isinstance(data.get("message"), str):
        return data["message"]
    if error.code == 422:
        return "The request is not valid."
    return error.description or "Error"
