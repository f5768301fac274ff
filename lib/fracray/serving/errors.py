"""The service's error answers: one JSON body ``{error, detail}`` whatever the status, the
statuses for refused uploads, and the last resort for anything a handler did not catch."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

__all__ = ["HTTP_STATUS_FOR_REJECT", "Rejected", "error_response", "request_id_of", "replica_errors",
           "validation_error", "http_error", "LastResortErrors"]

logger = logging.getLogger("ray.serve")

# Why an upload was refused -> the HTTP status that says so.
HTTP_STATUS_FOR_REJECT = {
    "empty_file": 400, "truncated": 400, "corrupt": 400, "too_small": 400, "read_error": 400,
    "not_an_image": 415, "unsupported_format": 415, "unsupported_dicom": 415,
    "decompression_bomb": 413,
    "out_of_scope": 422,  # decodes, but is not a limb radiograph (imaging.scope): no probability is given
}


class Rejected(Exception):
    """An error answer. ``per_image``: about one image of a study (listed there, the rest scored),
    else about the whole request."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None, *,
                 per_image: bool = False):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers or {}
        self.per_image = per_image


def error_response(status: int, reason: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError):
    # FastAPI's own 422 body is {"detail": [...]}; ours is the service's one error body.
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(422, "invalid_parameter", problems or str(exc))


async def http_error(request: Request, exc: StarletteHTTPException):
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, reason, exc.detail, getattr(exc, "headers", None))


def request_id_of(scope_or_request) -> str:
    headers = scope_or_request.headers if isinstance(scope_or_request, Request) else None
    if headers is not None:
        return headers.get("x-request-id", "-")
    for key, value in scope_or_request.get("headers", ()):
        if key == b"x-request-id":
            return value.decode("latin-1")
    return "-"


# Errors from a model replica that died (kill -9, OOM, node loss) or is gone: retried once on
# another replica, then 503 + Retry-After. Imported lazily: Ray's exception classes.
def replica_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError, DeploymentUnavailableError


class LastResortErrors:
    """Pure ASGI middleware: a JSON error (with the request id, logged) for anything that
    escaped a handler, never a bare 500 page."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # a handler bug: never a bare 500 page, always a JSON body
            rid = request_id_of(scope)
            logger.exception("request %s: unhandled %s", rid, type(exc).__name__)
            if not started:
                await error_response(500, "internal_error", f"The service failed on this request "
                                     f"({type(exc).__name__}); request id {rid}")(scope, receive, send)
