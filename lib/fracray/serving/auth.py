"""The bearer token: which paths need it, and the gate that checks it before anything of a
request is parsed (so a bad query with no token is 401, not 422)."""

from __future__ import annotations

import hmac
import os
from typing import Callable

from ray import serve
from ray.serve.exceptions import RayServeException

from .errors import error_response

__all__ = ["OPEN_PATHS", "DOCS_PATHS", "BearerAuth", "BearerGate", "replica_auth"]

OPEN_PATHS = ("/healthz",)  # liveness: no token, no model facts
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")  # open only with public_docs


class BearerAuth:
    """One ingress's rule: the token is the value of the variable ``token_env`` names (none: the
    service is open), required on every path but OPEN_PATHS (and DOCS_PATHS with ``public_docs``)."""

    def __init__(self, token_env: str, public_docs: bool = False):
        token = os.environ.get(token_env) or None
        self.token = token.encode("utf-8") if token else None
        self.open_paths = OPEN_PATHS + (DOCS_PATHS if public_docs else ())

    def is_open(self, path: str) -> bool:
        return path in self.open_paths

    def authorized(self, header: bytes) -> bool:
        """Bearer token check on the raw header bytes: any byte string compares (a non-ASCII
        value is simply wrong), in constant time."""
        scheme, _, supplied = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(supplied.strip(), self.token)


def replica_auth() -> BearerAuth | None:
    """The rule of the ingress this Serve replica runs, asked of Serve's replica context (as Serve's
    FastAPI integration finds an endpoint's ``self``); None outside a replica."""
    try:
        ingress = serve.get_replica_context().servable_object
    except RayServeException:
        return None
    return getattr(ingress, "auth", None)


class BearerGate:
    """Pure ASGI middleware in front of the ingress's routes: authentication before anything
    of the request is parsed. ``auth_of()`` gives the rule (None: nothing to check)."""

    def __init__(self, app, auth_of: Callable[[], BearerAuth | None] = replica_auth):
        self.app = app
        self.auth_of = auth_of

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            auth = self.auth_of()
            if auth is not None and auth.token is not None and not auth.is_open(scope.get("path", "")):
                headers = dict(scope.get("headers", ()))
                if not auth.authorized(headers.get(b"authorization", b"")):
                    response = error_response(401, "unauthorized", "Missing or wrong bearer token: send "
                                              "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send)
        return await self.app(scope, receive, send)
