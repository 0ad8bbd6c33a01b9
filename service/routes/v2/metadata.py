"""The v2 protocol's health, server and model metadata, and model configuration."""

from __future__ import annotations

from fastapi import APIRouter

from service import __version__
from service.errors import ModelNotFound, ModelNotReady
from service.registry import ServedModel
from service.routes.deps import AppContext, Context
from service.v2 import describe
from service.v2.schemas import (
    V2_ERRORS,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
)

router = APIRouter(tags=["KServe v2 / Open Inference Protocol"], responses=V2_ERRORS)

SERVER_NAME = "resnet-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
MODEL = "/v2/models/{model}"
VERSION = "/v2/models/{model}/versions/{version}"


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
