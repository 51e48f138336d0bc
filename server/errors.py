"""OpenAI-shaped errors for every failure.

Clients written against the OpenAI API (the official SDKs among them) read
``{"error": {"message", "type", "param", "code"}}`` and map the HTTP status to an exception class;
a FastAPI default body (``{"detail": ...}``) or a 422 would surface as an unhelpful generic error.
So every path that can fail — our own checks, FastAPI's validation, malformed JSON, unknown routes,
unexpected exceptions — ends in :func:`error_response`.
"""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error to send to the client as-is (status, OpenAI error body, extra headers)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(err: BaseException, request_id: str, where: str = "") -> APIError:
    """A failure of ours, not the client's: the traceback goes to the log under ``request_id``,
    the client gets a 500 that names it (also as the ``x-request-id`` header)."""
    logger.error("request %s%s failed", request_id, f" ({where})" if where else "", exc_info=err)
    return APIError(500, f"internal error ({type(err).__name__}) in request {request_id}; the server log has the "
                    "traceback", code="internal_error", headers={"x-request-id": request_id})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def sse_error_event(error: APIError) -> str:
    """The event a stream sends when it fails after the 200 status line has gone out."""
    return f"data: {json.dumps(error.body())}\n\n"


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "nullable"}


def _field_path(loc) -> list[str]:
    """The field path of a pydantic error location, without the union-member tags pydantic adds
    (``stop.list[str].3``, ``messages.0.content.TextPart``): clients want the field they sent."""
    parts = []
    for part in loc:
        text = str(part)
        if part == "body" and not parts:
            continue
        if isinstance(part, str) and ("[" in text or "-" in text or text in _TYPE_TAGS or text[:1].isupper()):
            continue
        parts.append(text)
    return parts


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = _field_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type", "missing"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}: this server does not accept it (docs/server.md lists the fields it honours)"
    elif param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure of ``app`` to an OpenAI-shaped body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(bad_request(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        from vllm.exceptions import VLLMValidationError

        if isinstance(exc, VLLMValidationError):  # a request vLLM refuses is the client's error
            return error_response(bad_request(str(exc), param=exc.parameter))
        return error_response(internal_error(exc, f"err-{uuid.uuid4().hex[:16]}", f"{request.method} {request.url.path}"))
