"""The v2 model-repository extension: list the repository, load and unload models.

Load and unload change what the server serves, so they are off unless the server runs
with ``model_control`` 'explicit' (Triton's model-control modes: 'none' is its default
too); the index stays readable either way.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from service.errors import BadRequest, Forbidden, ModelNotFound
from service.registry import State
from service.repository import RepositoryError, scan
from service.routes.deps import AppContext, Context
from service.v2 import describe
from service.v2.codec import validation_message
from service.v2.schemas import (
    V2_ERRORS,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    V2Error,
)

router = APIRouter(tags=["KServe v2 / Open Inference Protocol"], responses=V2_ERRORS)
_FORBIDDEN: dict[int | str, dict[str, object]] = {
    403: {"model": V2Error, "description": "Model control is off (model_control 'none')"}
}


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryIndexEntry],
    summary="Every model version in the repository directory, loaded or not",
)
async def repository_index(request: Request, context: Context) -> list[RepositoryIndexEntry]:
    body = await _optional_body(request, context, RepositoryIndexRequest)
    return await _index(context, None, ready_only=body.ready)


@router.post(
    "/v2/repository/models/{model}/load",
    response_model=list[RepositoryIndexEntry],
    responses=_FORBIDDEN,
    summary="Load (or reload) a model from the repository directory (model_control explicit)",
)
async def repository_load(
    model: str, request: Request, context: Context
) -> list[RepositoryIndexEntry]:
    _check_model_control(context, "load")
    body = await _optional_body(request, context, RepositoryModelRequest)
    overrides = [k for k in body.parameters if k == "config" or k.startswith("file:")]
    if overrides:
        raise BadRequest(
            f"parameters {overrides} are not supported: models load from the repository "
            f"directory as they are (config.json next to the versions sets batching)"
        )
    await context.registry.load(model)
    failed = [s for s in context.registry.models.get(model, {}).values() if s.state is State.FAILED]
    if failed:
        raise BadRequest(
            f"model {model!r} did not load: "
            + "; ".join(f"version {s.version} {s.reason}" for s in failed)
        )
    return await _index(context, model, ready_only=False)


@router.post(
    "/v2/repository/models/{model}/unload",
    response_model=list[RepositoryIndexEntry],
    responses=_FORBIDDEN,
    summary="Unload a model; its requests in flight finish first (model_control explicit)",
)
async def repository_unload(
    model: str, request: Request, context: Context
) -> list[RepositoryIndexEntry]:
    _check_model_control(context, "unload")
    await _optional_body(request, context, RepositoryModelRequest)  # unload_dependents: no-op
    registry = context.registry
    if model not in registry.models and not (context.settings.models_dir / model).is_dir():
        raise ModelNotFound(f"unknown model {model!r}; served models: {', '.join(registry.models)}")
    await registry.unload(model)
    return await _index(context, model, ready_only=False)


def _check_model_control(context: AppContext, action: str) -> None:
    """403 unless the server was started with model control turned on."""
    if context.settings.model_control != "explicit":
        raise Forbidden(
            f"model control is off: this server does not {action} models at run time. Start "
            "it with --model-control explicit (RESNET_SERVE_MODEL_CONTROL=explicit), "
            "together with --api-keys, to allow load and unload"
        )


_Body = TypeVar("_Body", bound=BaseModel)


async def _optional_body(request: Request, context: AppContext, schema: type[_Body]) -> _Body:
    """A small JSON request body that may be absent (tritonclient sends none or '{}')."""
    body = await context.dataplane.read_body(request)
    if not body.strip():
        return schema()
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(f"invalid request body: {validation_message(exc)}") from None


async def _index(
    context: AppContext, model: str | None, *, ready_only: bool
) -> list[RepositoryIndexEntry]:
    try:
        on_disk = await asyncio.to_thread(scan, context.settings.models_dir)
    except RepositoryError:
        on_disk = {}
    entries = describe.repository_index(context.registry, on_disk, ready_only=ready_only)
    return [e for e in entries if model is None or e.name == model]
