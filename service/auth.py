"""Optional API keys: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.

When ``api_keys`` is set, every route needs one of the keys except those a probe, a
scraper or a reader of the docs uses: liveness, readiness (``/healthz``, ``/readyz``,
``/v2/health/*``), ``/metrics`` and the OpenAPI pages. Everything else, inference
(``/predict``, ``/embed``, ``/v2/models/.../infer``) and admin (``/models``, the v2
repository's load/unload), answers 401 without a valid key: deny unless listed open.
Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized
from service.middleware import header, send_error

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
"""Paths answered without a key."""


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries: a Bearer token, else the X-API-Key header."""
    authorization = header(scope, b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return header(scope, b"x-api-key")


class ApiKeyMiddleware:
    """401 for requests outside :data:`OPEN_PATHS` that carry none of the keys."""

    def __init__(self, app: ASGIApp, *, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("give at least one API key")
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if key is None:
            await send_error(
                scope,
                send,
                Unauthorized(
                    "this route needs an API key: send 'Authorization: Bearer KEY' or "
                    "'X-API-Key: KEY'"
                ),
            )
            return
        # Compare with every key, so that the time taken does not say which one is close.
        matches = [hmac.compare_digest(key, known) for known in self.keys]
        if not any(matches):
            log.debug("rejected an invalid API key for %s", scope["path"])
            await send_error(scope, send, Unauthorized("the API key is not valid"))
            return
        await self.app(scope, receive, send)


def document_api_keys(app: FastAPI) -> None:
    """Declare both ways of sending a key in the OpenAPI document (/docs' Authorize)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
