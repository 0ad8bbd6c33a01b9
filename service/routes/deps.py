"""What route handlers need from the app, as ``Annotated`` dependencies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from service.metrics import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


@dataclass(frozen=True)
class AppContext:
    """The long-lived parts of one app, built by ``create_app``."""

    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor


async def get_context(request: Request) -> AppContext:
    # async: FastAPI would run a plain function in a worker thread, a thread hop per request.
    context: AppContext = request.app.state.context
    return context


Context = Annotated[AppContext, Depends(get_context)]
ModelName = Annotated[
    str | None,
    Query(description="Model name (default: the configured default model, or the only one)."),
]
ModelVersion = Annotated[int | None, Query(ge=1, description="Model version (default: latest).")]
