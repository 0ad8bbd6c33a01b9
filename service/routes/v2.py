"""The Open Inference Protocol (KServe v2) over REST, for tritonclient, KServe and load tools.

Health, server and model metadata, inference (JSON and binary tensor data), and the
classification, model-configuration and model-repository extensions. Inference requests
join the same batchers as /predict (see :mod:`service.v2.inference`). Errors under /v2
come back as the protocol's ``{"error": "..."}`` (``service.errors.error_body``).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError

from service import __version__
from service.errors import BadRequest, ModelNotFound, ModelNotReady
from service.registry import ServedModel, State
from service.repository import RepositoryError, scan
from service.routes.deps import AppContext, Context
from service.routes.images import json_response, read_body
from service.v2 import describe, inference
from service.v2.codec import (
    HEADER_LENGTH,
    decode_inputs,
    decompress,
    encode_response,
    parse_request,
    split_body,
    validation_message,
)
from service.v2.schemas import (
    V2_ERRORS,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    ServerLive,
    ServerMetadata,
    ServerReady,
    inline_schema,
)

router = APIRouter(tags=["KServe v2 / Open Inference Protocol"], responses=V2_ERRORS)

SERVER_NAME = "resnet-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
MODEL = "/v2/models/{model}"
VERSION = "/v2/models/{model}/versions/{version}"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The JSON request; with the binary data extension, raw tensor bytes "
        f"follow it and the {HEADER_LENGTH} header gives the JSON's length. Any or no "
        "Content-Type; Content-Encoding gzip or deflate.",
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": _BINARY,
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "JSON, or JSON then binary outputs (application/octet-stream, with "
        f"{HEADER_LENGTH}) when an output asked for binary_data",
        "content": {"application/octet-stream": _BINARY},
    }
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=ServerLive, summary="Server liveness")
async def server_live() -> ServerLive:
    return ServerLive()


@router.get("/v2/health/ready", response_model=ServerReady, summary="Server readiness (503 if not)")
async def server_ready(context: Context) -> ServerReady:
    ready, reason = context.registry.readiness()
    if not ready:
        raise ModelNotReady(f"not ready: {reason}")
    return ServerReady()


@router.get(MODEL, response_model=ModelMetadata, summary="Model metadata (latest version)")
async def model_metadata(model: str, context: Context) -> ModelMetadata:
    return _metadata(context, model, None)


@router.get(VERSION, response_model=ModelMetadata, summary="Model version metadata")
async def model_version_metadata(model: str, version: str, context: Context) -> ModelMetadata:
    return _metadata(context, model, version)


@router.get(MODEL + "/ready", response_model=ModelReady, summary="Model readiness (503 if not)")
async def model_ready(model: str, context: Context) -> ModelReady:
    return ModelReady(name=resolve(context, model, None).name)


@router.get(VERSION + "/ready", response_model=ModelReady, summary="Model version readiness")
async def model_version_ready(model: str, version: str, context: Context) -> ModelReady:
    return ModelReady(name=resolve(context, model, version).name)


@router.get(
    MODEL + "/config",
    response_model=ModelConfig,
    response_model_exclude_none=True,
    summary="Model config (Triton's)",
)
async def model_config(model: str, context: Context) -> ModelConfig:
    return describe.model_config(resolve(context, model, None))


@router.get(
    VERSION + "/config",
    response_model=ModelConfig,
    response_model_exclude_none=True,
    summary="Model version config",
)
async def model_version_config(model: str, version: str, context: Context) -> ModelConfig:
    return describe.model_config(resolve(context, model, version))


@router.post(
    MODEL + "/infer",
    openapi_extra=_INFER_OPENAPI,
    responses=_INFER_RESPONSES,
    summary="Inference (latest version)",
)
async def model_infer(model: str, request: Request, context: Context) -> Response:
    return await _infer(request, context, model, None)


@router.post(
    VERSION + "/infer",
    openapi_extra=_INFER_OPENAPI,
    responses=_INFER_RESPONSES,
    summary="Inference on a model version",
)
async def model_version_infer(
    model: str, version: str, request: Request, context: Context
) -> Response:
    return await _infer(request, context, model, version)


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
    summary="Load (or reload) a model from the repository directory",
)
async def repository_load(
    model: str, request: Request, context: Context
) -> list[RepositoryIndexEntry]:
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
    summary="Unload a model; its requests in flight finish first",
)
async def repository_unload(
    model: str, request: Request, context: Context
) -> list[RepositoryIndexEntry]:
    await _optional_body(request, context, RepositoryModelRequest)  # unload_dependents: no-op
    registry = context.registry
    if model not in registry.models and not (context.settings.models_dir / model).is_dir():
        raise ModelNotFound(f"unknown model {model!r}; served models: {', '.join(registry.models)}")
    await registry.unload(model)
    return await _index(context, model, ready_only=False)


def resolve(context: AppContext, model: str, version: str | None) -> ServedModel:
    """The ready model version named in the path: 404 unknown, 503 not ready."""
    number = None
    if version is not None:
        if not (version.isascii() and version.isdigit()) or int(version) < 1:
            raise ModelNotFound(
                f"model {model!r} has no version {version!r}; versions are positive integers"
            )
        number = int(version)
    return context.registry.resolve(model, number)


def _metadata(context: AppContext, model: str, version: str | None) -> ModelMetadata:
    served = resolve(context, model, version)
    return describe.model_metadata(served, sorted(context.registry.models.get(model, {})))


async def _infer(
    request: Request, context: AppContext, model: str, version: str | None
) -> Response:
    served = resolve(context, model, version)
    request.state.model = served.name
    # In flight from here: unloading the model waits for this request (body included).
    with served.in_flight():
        labels = inference.engine_of(served).card.labels
        settings = context.settings
        body = await read_body(request, settings)
        encoding = request.headers.get("content-encoding")
        body = decompress(body, encoding, limit=settings.max_body_bytes)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        infer_request = parse_request(header)
        specs = inference.output_specs(infer_request, served)
        tensor = inference.single_input(decode_inputs(infer_request.inputs, binary), served)
        rows = await inference.run(request, served, context, tensor)
    outputs, sections = inference.encode_outputs(rows, specs, labels)
    payload: dict[str, object] = {"model_name": served.name, "model_version": str(served.version)}
    if infer_request.id is not None:
        payload["id"] = infer_request.id
    payload["outputs"] = outputs
    if not sections:
        return json_response(payload)
    content, header_length = encode_response(payload, sections)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


_Body = TypeVar("_Body", bound=BaseModel)


async def _optional_body(request: Request, context: AppContext, schema: type[_Body]) -> _Body:
    """A small JSON request body that may be absent (tritonclient sends none or '{}')."""
    body = await read_body(request, context.settings)
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
