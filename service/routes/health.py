"""GET /healthz (alive), /readyz (every model loaded and warm) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.routes.deps import Context
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready, with the reason"}},
    summary="Readiness: every model is loaded and warmed up",
)
async def readyz(context: Context) -> JSONResponse:
    registry = context.registry
    ready, reason = registry.readiness()
    body = Readiness(
        ready=ready,
        reason=reason,
        models={
            f"{s.name}/{s.version}": s.state.value
            for versions in registry.models.values()
            for s in versions.values()
        },
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(context: Context) -> Response:
    return Response(context.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
