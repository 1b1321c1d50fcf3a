"""One exception base, one handler, one response shape (OpenAI's).

Messages are fixed texts written here or by the raising code; they never contain a
submitted value, so an error response cannot reflect secrets back or into logs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("onetoken.errors")


class OnetokenError(Exception):
    status_code: int = 500
    type: str = "api_error"
    code: str = "internal_error"

    def __init_subclass__(
        cls, *, status: int | None = None, kind: str | None = None, code: str | None = None
    ) -> None:
        """`class NotFound(OnetokenError, status=404, code="not_found")`: the answer's
        status, error type and default code, each kept from the parent when not given."""
        super().__init_subclass__()
        for attr, value in (("status_code", status), ("type", kind), ("code", code)):
            if value is not None:
                setattr(cls, attr, value)

    def __init__(
        self,
        message: str = "Internal error.",
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


_INVALID = "invalid_request_error"


class BadRequest(OnetokenError, status=400, kind=_INVALID, code="invalid_request"): ...


class Unauthorized(
    OnetokenError, status=401, kind="authentication_error", code="invalid_token"
): ...


class Forbidden(OnetokenError, status=403, kind="permission_error", code="permission_denied"): ...


class NotFound(OnetokenError, status=404, kind=_INVALID, code="not_found"): ...


class Conflict(OnetokenError, status=409, kind=_INVALID, code="conflict"): ...


class Unprocessable(OnetokenError, status=422, kind=_INVALID, code="invalid_value"): ...


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """The body of every error answer of the control API."""

    error: ErrorDetail


# Documented on every /api/v1 operation (it replaces FastAPI's default 422 schema, which is
# not what the handlers below send). 503: a backing service of the running server (the
# gateway's call log, the webhook dispatcher) is not there.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Bad request."),
        (401, "No valid session."),
        (403, "Permission denied."),
        (404, "Not found."),
        (409, "Conflict with the current state."),
        (422, "Invalid request."),
        (429, "Too many attempts."),
        (503, "A backing service is unavailable."),
    )
}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Pydantic error types whose messages describe the constraint, never the input.
_SAFE_PYDANTIC_TYPES = frozenset(
    {
        "missing",
        "string_type",
        "string_too_short",
        "string_too_long",
        "string_pattern_mismatch",
        "int_type",
        "int_parsing",
        "int_from_float",
        "bool_type",
        "bool_parsing",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "literal_error",
        "enum",
        "list_type",
        "too_long",
        "too_short",
        "dict_type",
        "model_type",
        "model_attributes_type",
        "datetime_type",
        "datetime_parsing",
        "datetime_from_date_parsing",
        "timezone_aware",
        "url_type",
        "url_parsing",
        "url_scheme",
        "none_required",
    }
)
# Error types raised by onetoken's own validators with fixed texts.
_SAFE_CUSTOM_PREFIX = "onetoken_"
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _param(loc: tuple[Any, ...], err_type: str) -> str | None:
    parts: list[str] = []
    fields = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    if err_type == "extra_forbidden" and fields:
        # The last element is a name the client made up; do not reflect it.
        fields = fields[:-1]
    for part in fields:
        if isinstance(part, int):
            parts.append(str(part))
        elif isinstance(part, str) and _NAME_RE.match(part):
            parts.append(part)
        else:
            parts.append("?")
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> str:
    err_type = str(err.get("type", ""))
    if err_type == "extra_forbidden":
        return "Unknown field."
    if err_type == "json_invalid":
        return "The request body is not valid JSON."
    if err_type in _SAFE_PYDANTIC_TYPES or err_type.startswith(_SAFE_CUSTOM_PREFIX):
        return str(err.get("msg", "Invalid value."))
    return "Invalid value."


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    err_type = str(first.get("type", ""))
    param = _param(tuple(first.get("loc", ())), err_type)
    message = _validation_message(first)
    if param:
        message = f"{message} (field: {param})"
    return JSONResponse(
        status_code=422,
        content=error_body(message, "invalid_request_error", "invalid_value", param),
    )


_HTTP_CODES: dict[int, tuple[str, str, str]] = {
    400: ("Bad request.", "invalid_request_error", "invalid_request"),
    401: ("Authentication required.", "authentication_error", "invalid_token"),
    403: ("Permission denied.", "permission_error", "permission_denied"),
    404: ("Not found.", "invalid_request_error", "not_found"),
    405: ("Method not allowed.", "invalid_request_error", "method_not_allowed"),
}


def install_error_handlers(app: FastAPI) -> None:
    async def onetoken_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OnetokenError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        # Fixed-value headers a subclass sets (e.g. Retry-After on 429).
        extra = getattr(exc, "headers", None)
        if isinstance(extra, dict):
            headers = {**(headers or {}), **extra}
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(exc.message, exc.type, exc.code, exc.param),
            headers=headers,
        )

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_response(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message, type_, code = _HTTP_CODES.get(
            exc.status_code, ("Request failed.", "api_error", "http_error")
        )
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(message, type_, code),
            headers=getattr(exc, "headers", None),
        )

    async def unhandled(_: Request, exc: Exception) -> JSONResponse:
        # Only the class name: exception texts (e.g. SQL parameters) may carry data.
        log.error("request.unhandled_exception", extra={"exc_type": type(exc).__name__})
        return JSONResponse(
            status_code=500,
            content=error_body("Internal error.", "api_error", "internal_error"),
        )

    app.add_exception_handler(OnetokenError, onetoken_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)
