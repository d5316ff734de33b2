"""The one place where errors become HTTP responses, in the OpenAI/vLLM error shape.

Body: `{"error": {"message": ..., "type": ..., "param": null, "code": <HTTP status>}}`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvfuse.errors import (
    AuthError,
    CapacityError,
    CodecError,
    InvalidRequestError,
    KvfuseError,
    ServiceUnavailableError,
    TierUnavailableError,
)

log = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    500: "InternalServerError",
}


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (404).

    Belongs in kvfuse/errors.py (as a generic NotFoundError); kept here until it moves.
    """


class BodyTooLargeError(InvalidRequestError):
    """The request body is larger than the configured limit (413)."""


def status_of(exc: BaseException) -> int:
    """The HTTP status code of an error."""
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, BodyTooLargeError):
        return 413
    if isinstance(exc, InvalidRequestError | RequestValidationError):
        return 400
    if isinstance(exc, CodecError):  # the prefill worker sent malformed frames
        return 502
    if isinstance(exc, ServiceUnavailableError | TierUnavailableError | CapacityError):
        return 503
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI-shaped error object of `exc` (internal errors carry no detail)."""
    status = status_of(exc)
    if isinstance(exc, RequestValidationError):
        message = validation_message(exc)
    elif isinstance(exc, HTTPException):
        message = str(exc.detail)
    elif isinstance(exc, KvfuseError):
        message = str(exc)
    else:
        message = "internal server error"
    kind = _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, KvfuseError):
        log.error("internal error", exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """`field.path: what is wrong` for the first few problems of a request body."""
    problems = []
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":
            return f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg")
        if err.get("type") == "finite_number":  # NaN/Infinity: say so, not "should be ≤ 100"
            msg = f"{err.get('input')} is not a finite number"
        problems.append(f"{loc or 'body'}: {msg}")
    return "; ".join(problems) or "invalid request body"


def install(app: FastAPI) -> None:
    """Routes every error raised by a handler through `error_response`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for kind in (KvfuseError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
