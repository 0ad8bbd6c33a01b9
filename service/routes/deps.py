"""What route handlers need from the app: its long-lived parts and their query parameters."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Self

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json

from service.dataplane import FILE_FIELDS, DataPlane
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


@dataclass(frozen=True)
class AppContext:
    """The long-lived parts of one app, built by ``create_app``."""

    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    dataplane: DataPlane


def context_of(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


async def get_context(request: Request) -> AppContext:
    # async: FastAPI would run a plain function in a worker thread, a thread hop per request.
    return context_of(request)


Context = Annotated[AppContext, Depends(get_context)]


class DirectRoute(APIRoute):
    """A route whose endpoint takes the ``Request`` and returns a ``Response`` itself.

    FastAPI documents it like any other (OpenAPI, from the decorator's arguments), and
    its exception handlers and middleware apply, but it calls the endpoint directly: no
    dependency solving, body parsing or response serialization per request, which the
    endpoint does not use. That machinery is about a tenth of the event loop's time per
    /predict under load, and the event loop is what limits a small model's throughput.
    The ``route_class`` of the inference routers; see FastAPI's "Custom Request and
    APIRoute class".
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        d = self.dependant
        resolved = (d.dependencies, d.path_params, d.query_params, d.header_params)
        # Calling the endpoint directly would skip these silently (an auth dependency too).
        if any(resolved) or d.cookie_params or d.body_params:
            raise TypeError(
                f"DirectRoute {path}: the endpoint must take only the Request, not "
                "dependencies or parameters that FastAPI would resolve"
            )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint


class QueryParams(BaseModel):
    """Query parameters that an inference route validates itself, in one pydantic call.

    FastAPI's per-parameter dependency machinery costs about 0.2 ms of event-loop time per
    request here, a sixth of all the loop does for a lone /predict; the hot routes
    (:class:`DirectRoute`) take only the ``Request`` and call :meth:`parse`. Errors are
    FastAPI's (a ``RequestValidationError``, answered 422 as for every other route) and
    :meth:`openapi` documents the parameters.
    """

    model_config = ConfigDict(frozen=True)

    model: str | None = Field(
        None, description="Model name (default: the configured default model, or the only one)."
    )
    version: int | None = Field(None, ge=1, description="Model version (default: latest).")

    @classmethod
    def parse(cls, request: Request) -> Self:
        try:
            return cls.model_validate(dict(request.query_params))
        except ValidationError as exc:
            errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    @classmethod
    def openapi(cls) -> list[dict[str, Any]]:
        """The OpenAPI ``parameters`` of these fields."""
        parameters = []
        for name, schema in cls.model_json_schema()["properties"].items():
            description = schema.pop("description", "")
            schema.pop("title", None)
            parameters.append(
                {"name": name, "in": "query", "required": False, "description": description}
                | {"schema": schema}
            )
        return parameters


def json_response(payload: object) -> Response:
    """JSON encoded by pydantic-core (fast for long float lists), no re-validation."""
    return Response(to_json(payload), media_type="application/json")


# OpenAPI description of an image request body (FastAPI cannot infer it from a raw body).
_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or multipart/form-data with one or more "
        f"file parts named {' or '.join(repr(f) for f in FILE_FIELDS)}.",
        "content": {
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "image/webp": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": _BINARY["schema"]}},
                    "required": ["file"],
                }
            },
        },
    }
}
