"""Limits enforced in Ray Serve's HTTP proxy, before a request costs memory anywhere else.

Serve's proxy reads a request body as fast as the client sends it and queues it for the
ingress replica, so a limit checked only in the ingress comes after the proxy (and then the
ingress) already hold the whole upload. This ASGI middleware runs inside the proxy
(Serve loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, which must be set in
the environment of every Ray node before Ray starts: ``configure_environment`` does that for
a local Ray; the cluster files set it) and:

- refuses header blocks over ``FRACRAY_MAX_HEADER_KB`` (431), URLs over ``FRACRAY_MAX_URL_KB``
  (414) and declared or streamed bodies over ``FRACRAY_MAX_BODY_MB`` (413) while reading, never
  buffering past the limit;
- answers 408 when the body stops arriving for ``FRACRAY_BODY_TIMEOUT_S`` (a Content-Length
  longer than the body sent would otherwise hold a connection for minutes);
- rewrites every error the proxy itself writes as plain text (Serve's backpressure 503,
  an unknown route's 404) into the service's one JSON error body ``{"error": ..., "detail": ...}``;
- sends a request once more when the proxy gave it no answer at all (an ingress replica that died
  under it: Serve then writes nothing and uvicorn a bare ``500 Internal Server Error``), since
  the guard holds its whole body and every endpoint of the service is free of side effects; a
  second failure is answered 503 ``replica_unavailable`` with Retry-After, in the JSON body;
- makes uvicorn's own answer to a request its HTTP parser refuses (a control byte in a header,
  a URL over 64 KB, a malformed request line: ``400 Invalid HTTP request received.``, written
  before any ASGI code runs) the JSON body too (:func:`json_parser_errors`).

The ingress keeps its own (application-level) upload limit: the proxy's is the outer bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

__all__ = ["GuardLimits", "ProxyGuard", "proxy_middlewares", "configure_environment", "json_parser_errors",
           "CALLBACK", "GUARD_HEADER", "PARSER_ERROR_DETAIL"]

logger = logging.getLogger("ray.serve")

CALLBACK = "fracray.serving.proxy_guard:proxy_middlewares"
GUARD_HEADER = b"x-fracray-proxy-guard"  # set on requests that passed the guard; the ingress checks it

# Status -> the error name for proxy-written errors (and anything else that arrives as plain text).
_REASON = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           408: "body_timeout", 413: "upload_too_large", 414: "url_too_long", 431: "headers_too_large",
           500: "internal_error",
           502: "bad_gateway", 503: "unavailable", 504: "timeout"}


class GuardLimits:
    """The proxy's limits, from the environment (the proxy runs in Ray's processes, not ours)."""

    def __init__(self, max_body_mb: float | None = None, max_header_kb: float | None = None,
                 body_timeout_s: float | None = None, max_url_kb: float | None = None):
        env = os.environ
        self.max_body = int(float(max_body_mb if max_body_mb is not None else env.get("FRACRAY_MAX_BODY_MB", 64))
                            * 1024 * 1024)
        self.max_header = int(float(max_header_kb if max_header_kb is not None
                                    else env.get("FRACRAY_MAX_HEADER_KB", 16)) * 1024)
        self.body_timeout = float(body_timeout_s if body_timeout_s is not None
                                  else env.get("FRACRAY_BODY_TIMEOUT_S", 30))
        # Path and query string; uvicorn's parser (httptools) refuses 64 KB and more itself.
        self.max_url = int(float(max_url_kb if max_url_kb is not None else env.get("FRACRAY_MAX_URL_KB", 8)) * 1024)
        if self.max_body <= 0 or self.max_header <= 0 or self.body_timeout <= 0 or self.max_url <= 0:
            raise ValueError(f"Proxy limits must be positive. Got body {self.max_body} B, headers "
                             f"{self.max_header} B, URL {self.max_url} B, body timeout {self.body_timeout} s")


def configure_environment(*, max_body_mb: float | None = None, max_header_kb: float | None = None,
                          body_timeout_s: float | None = None, max_url_kb: float | None = None) -> None:
    """Set the variables that install the guard in Serve's proxy; call before Ray starts
    (a running Ray's proxy keeps the environment it was started with)."""
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = CALLBACK
    for name, value in (("FRACRAY_MAX_BODY_MB", max_body_mb), ("FRACRAY_MAX_HEADER_KB", max_header_kb),
                        ("FRACRAY_BODY_TIMEOUT_S", body_timeout_s), ("FRACRAY_MAX_URL_KB", max_url_kb)):
        if value is not None:
            os.environ[name] = str(value)
    GuardLimits()  # loud now, not in the proxy's log


def proxy_middlewares() -> list:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    json_parser_errors()  # Serve calls this in the proxy process before its uvicorn serves anything
    return [Middleware(ProxyGuard, limits=GuardLimits())]


PARSER_ERROR_DETAIL = ("The request is not valid HTTP/1.1 and was refused before it was read ({message}): a control "
                       "character in a header name or value, a URL or header block over the parser's own limit "
                       "(64 KB for a URL), or a malformed request line or header. The connection is closed")


def json_parser_errors() -> list[str]:
    """Make uvicorn's answer to a request its HTTP parser refuses the service's JSON error body.

    uvicorn writes that ``400`` (``Invalid HTTP request received.``, text/plain) itself, from its
    protocol class's ``send_400_response``, before the request exists for any ASGI code; this
    replaces that method of each protocol class uvicorn has (httptools, h11, ...) with one that
    writes the same status with ``{"error": "bad_request", "detail": ...}`` and closes the
    connection, as uvicorn's does. Returns the classes it changed (none where uvicorn has no
    such method: its plain text then stays, and the tests say so)."""
    import importlib

    changed = []
    for module, name in (("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
                         ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
                         ("uvicorn.protocols.http.zttp_impl", "ZttpProtocol")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except Exception:  # that parser is not installed, or this uvicorn has no such class
            continue
        current = getattr(cls, "send_400_response", None)
        if current is None:
            continue
        if not getattr(current, "_fracray", False):
            cls.send_400_response = _send_json_400
        changed.append(name)
    return changed


def _send_json_400(self, msg: str) -> None:
    """uvicorn's ``send_400_response(msg)`` with the JSON body (``self.transport``: the connection)."""
    body = json.dumps({"error": "bad_request", "detail": PARSER_ERROR_DETAIL.format(message=msg.rstrip("."))}).encode()
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for key, value in getattr(getattr(self, "server_state", None), "default_headers", ()):  # server, date
        head.append(key + b": " + value + b"\r\n")
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    self.transport.write(b"".join(head) + body)
    self.transport.close()


_send_json_400._fracray = True  # type: ignore[attr-defined]


def _json_response(status: int, reason: str, detail: str, headers: list[tuple[bytes, bytes]] = (), *,
                   close: bool = True) -> list[dict]:
    body = json.dumps({"error": reason, "detail": detail}).encode()
    # close: the guard answered before reading the whole body, so the connection cannot be reused
    extra = [(b"connection", b"close")] if close else []
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *extra, *headers]},
            {"type": "http.response.body", "body": body, "more_body": False}]


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class ProxyGuard:
    """Pure ASGI middleware (no per-request buffering beyond the limit)."""

    def __init__(self, app, limits: GuardLimits | None = None):
        self.app = app
        self.limits = limits or GuardLimits()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_headers(scope)
            self._check_url(scope)
            body = await self._read_body(scope, receive)
        except _Refused as exc:
            for message in _json_response(exc.status, exc.reason, exc.detail):
                await send(message)
            return
        scope = dict(scope)
        scope["headers"] = [*scope["headers"], (GUARD_HEADER, b"1")]
        disconnected = False

        for attempt in (1, 2):
            delivered = False

            async def replay():
                nonlocal delivered, disconnected
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                message = await receive()  # then the real stream: it says when the client disconnects
                disconnected = disconnected or message["type"] == "http.disconnect"
                return message

            answer = _JsonErrors(send)
            failure: Exception | None = None
            try:
                await self.app(scope, replay, answer)
            except Exception as exc:  # uvicorn would write a bare 500 for it
                failure = exc
            if answer.started:
                if failure is not None:
                    raise failure  # mid-answer: nothing can be rewritten; uvicorn closes the connection
                return
            if disconnected:
                return  # nobody left to answer
            # No answer at all: Serve's proxy writes none for a replica that died under the request
            # (it logs "Request failed"), and uvicorn would send a bare 500 text.
            logger.warning("fracray proxy guard: %s %s got no answer (%s), attempt %d", scope.get("method"),
                           scope.get("path"), type(failure).__name__ if failure else "no response", attempt)
        for message in _json_response(503, "replica_unavailable", "The service's ingress gave no answer twice (a replica "
                                      "that died or is restarting); retry shortly", [(b"retry-after", b"2")]):
            await send(message)

    def _check_headers(self, scope) -> None:
        size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if size > self.limits.max_header:
            raise _Refused(431, "headers_too_large", f"The request's headers are {size} bytes; the limit is "
                                                     f"{self.limits.max_header} bytes (FRACRAY_MAX_HEADER_KB)")

    def _check_url(self, scope) -> None:
        size = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
        if size > self.limits.max_url:
            raise _Refused(414, "url_too_long", f"The request's URL is {size} bytes; the limit is "
                                                f"{self.limits.max_url} bytes (FRACRAY_MAX_URL_KB)")

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Refused(400, "bad_request", f"Content-Length is not a number: {value[:40]!r}") from None
                if declared > limit:
                    raise _Refused(413, "upload_too_large", f"Upload of {declared} bytes exceeds the service's limit "
                                                            f"of {limit} bytes (FRACRAY_MAX_BODY_MB)")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout)
            except asyncio.TimeoutError:
                raise _Refused(408, "body_timeout", f"No request body arrived for {self.limits.body_timeout:g} s "
                                                    f"after {size} bytes (is Content-Length longer than the body?)"
                               ) from None
            if message["type"] == "http.disconnect":
                raise _Refused(400, "client_disconnected", "The client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "upload_too_large", f"Upload exceeds the service's limit of {limit} bytes "
                                                        f"(FRACRAY_MAX_BODY_MB)")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _JsonErrors:
    """``send`` that turns a plain-text error response into the JSON error body."""

    def __init__(self, send):
        self.send = send
        self.held: dict[str, Any] | None = None
        self.body: list[bytes] = []
        self.started = False  # an answer began (sent, or held to be rewritten)

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.started = True
            headers = {k.lower(): v for k, v in message.get("headers", ())}
            if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                self.held = message  # rewrite once the body is complete
                return
        elif message["type"] == "http.response.body" and self.held is not None:
            self.body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = self.held["status"]
            text = b"".join(self.body).decode("utf-8", "replace").strip()[:500] or f"HTTP {status}"
            keep = [(k, v) for k, v in self.held.get("headers", ())
                    if k.lower() not in (b"content-type", b"content-length")]
            self.held = None
            for out in _json_response(status, _REASON.get(status, "error"), text, keep, close=False):
                await self.send(out)
            return
        await self.send(message)
