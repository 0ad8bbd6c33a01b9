"""DirectRoute refuses endpoints whose dependencies or parameters it would skip."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, Request, Response

from service.routes.deps import DirectRoute


async def _check_key() -> None:
    """Stands for an auth dependency: DirectRoute would never call it."""


def test_request_only_endpoint_is_accepted() -> None:
    router = APIRouter(route_class=DirectRoute)

    @router.post("/ok")
    async def ok(request: Request) -> Response:
        return Response(b"")

    assert isinstance(router.routes[0], DirectRoute)


def test_route_dependency_is_refused() -> None:
    router = APIRouter(route_class=DirectRoute)
    with pytest.raises(TypeError, match="DirectRoute /guarded: the endpoint must take only"):

        @router.post("/guarded", dependencies=[Depends(_check_key)])
        async def guarded(request: Request) -> Response:
            return Response(b"")


def test_query_parameter_is_refused() -> None:
    router = APIRouter(route_class=DirectRoute)
    with pytest.raises(TypeError, match="DirectRoute /query"):

        @router.post("/query")
        async def query(request: Request, top_k: int = 5) -> Response:
            return Response(b"")


def test_every_inference_route_is_direct() -> None:
    """/predict, /embed and v2 infer skip FastAPI's per-request machinery; the rest keep it."""
    from service.routes import embed, health, models, predict
    from service.routes.v2 import infer, metadata, repository

    def direct(*routers: APIRouter) -> set[tuple[str, bool]]:
        return {
            (getattr(route, "path", ""), isinstance(route, DirectRoute))
            for router in routers
            for route in router.routes
        }

    assert direct(predict.router, embed.router, infer.router) == {
        ("/predict", True),
        ("/embed", True),
        ("/v2/models/{model}/infer", True),
        ("/v2/models/{model}/versions/{version}/infer", True),
    }
    others = direct(health.router, models.router, metadata.router, repository.router)
    assert len(others) > 10 and not any(is_direct for _, is_direct in others)
