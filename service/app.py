"""The FastAPI application factory: ``create_app(settings)``.

Nothing heavy happens at import or in the factory: the lifespan starts loading the models
in the background, so the server answers ``/healthz`` at once and ``/readyz`` turns 200
once every model is loaded and warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service import __version__
from service.auth import ApiKeyMiddleware, document_api_keys
from service.dataplane import DataPlane
from service.errors import ServiceError, error_body
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import (
    CORS_EXPOSED_HEADERS,
    CORS_REQUEST_HEADERS,
    REQUEST_ID_HEADER,
    LimitsMiddleware,
    RequestContextMiddleware,
)
from service.registry import ModelRegistry
from service.remote_registry import RemoteRegistry
from service.routes import embed, health, models, predict, v2
from service.routes.deps import AppContext
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Image classification and embeddings with ResNets exported to ONNX, served by ONNX Runtime
with dynamic batching. Send an image as the raw body (`Content-Type: image/jpeg`, ...) or
as multipart/form-data file parts named `file`. Errors come back as
`{"error": {"code": "...", "message": "..."}}`.

Request headers: `X-Request-ID` (echoed on the response and in the log lines; generated when
absent), `X-Request-Timeout` (seconds; less than the server's limit shortens the deadline,
504 past it) and, when the server has API keys, `Authorization: Bearer KEY` or
`X-API-Key: KEY`. A 503 `overloaded` comes with `Retry-After`.
"""


def create_app(settings: Settings, *, engine_path: str | None = None) -> FastAPI:
    """A new app serving the models under ``settings.models_dir``.

    With ``engine_path`` it is one front end of several (``--workers``): the models run
    in the engine process listening there (:mod:`service.supervisor`).
    """
    metrics = Metrics()
    registry = (
        ModelRegistry(settings, metrics)
        if engine_path is None
        else RemoteRegistry(settings, metrics, engine_path)
    )
    context = AppContext(
        settings=settings,
        registry=registry,
        metrics=metrics,
        dataplane=DataPlane.create(settings, registry, metrics),
    )
    if settings.model_control == "explicit" and not settings.api_keys:
        log.warning(
            "model_control is 'explicit' without api_keys: anyone who reaches the port can "
            "load and unload models (POST /v2/repository/models/NAME/unload takes one down)"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(context.registry.load_all(), name="load-models")
        loading.add_done_callback(_log_failure)
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await context.registry.close()
            context.dataplane.close()

    app = FastAPI(
        title="resnet-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.context = context
    # Each add_middleware wraps the ones before it: metrics see every answer, the request
    # ID is on all of them, CORS headers reach even a 401, and nothing unauthenticated is
    # admitted or read.
    app.add_middleware(LimitsMiddleware, settings=settings)
    if settings.api_keys:
        keys = [key.get_secret_value() for key in settings.api_keys]
        app.add_middleware(ApiKeyMiddleware, keys=keys)
        document_api_keys(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=list(CORS_REQUEST_HEADERS),
            expose_headers=list(CORS_EXPOSED_HEADERS),
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unhandled_error)
    for module in (predict, embed, models, health, v2):
        app.include_router(module.router)
    return app


_SHEDDING = frozenset({"overloaded", "deadline_exceeded", "shutting_down"})


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading models failed", exc_info=task.exception())


def _error(request: Request, status: int, code: str, message: str, **kw: object) -> JSONResponse:
    request.state.error_code = code
    body = error_body(request.url.path, code, message)
    return JSONResponse(body, status_code=status, **kw)  # type: ignore[arg-type]


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    # Shed load quietly: a line per 503/504 would cost the most when the service has the
    # least to spare (the metrics count them by code).
    level = logging.DEBUG if exc.code in _SHEDDING else logging.WARNING
    if exc.status >= 500:
        log.log(level, "%s %s: %s %s", request.method, request.url.path, exc.code, exc.message)
    return _error(request, exc.status, exc.code, exc.message, headers=exc.headers or None)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"] if p not in ("query", "path", "body"))
        problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return _error(request, 422, "invalid_parameter", "; ".join(problems))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    code = codes.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
    return _error(request, exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    # The client left while sending its body; nobody reads this, but metrics count it.
    return _error(request, 499, "client_disconnected", "the client disconnected")


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    # Answered outside all middleware (Starlette's ServerErrorMiddleware): add the ID here.
    headers = {REQUEST_ID_HEADER: getattr(request.state, "request_id", "-")}
    return _error(
        request, 500, "internal_error", "internal error; see the service log", headers=headers
    )
