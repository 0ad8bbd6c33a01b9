"""GET /models and /models/{name}: what is served, how, and whether it is ready."""

from __future__ import annotations

from fastapi import APIRouter

from service.errors import ModelNotFound
from service.registry import ServedModel
from service.routes.deps import Context
from service.schemas import ERROR_RESPONSES, BatchingInfo, ModelInfo, ModelList, VersionInfo

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="List the served models")
async def list_models(context: Context) -> ModelList:
    names = list(context.registry.models)
    return ModelList(models=[_model_info(context, name, labels=False) for name in names])


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses={404: ERROR_RESPONSES[404]},
    summary="Describe one model, with its labels",
)
async def get_model(name: str, context: Context) -> ModelInfo:
    if name not in context.registry.models:
        raise ModelNotFound(
            f"unknown model {name!r}; served models: {', '.join(context.registry.models) or 'none'}"
        )
    return _model_info(context, name, labels=True)


def _model_info(context: Context, name: str, *, labels: bool) -> ModelInfo:
    versions = context.registry.models[name]
    latest = versions[max(versions)]
    is_default = context.registry.default_name() == name
    return ModelInfo(
        name=name,
        latest_version=latest.version,
        default=is_default,
        versions=[_version_info(s) for s in versions.values()],
        labels=list(latest.loaded.engine.card.labels) if labels and latest.loaded else None,
    )


def _version_info(served: ServedModel) -> VersionInfo:
    loaded = served.loaded
    engine = loaded.engine if loaded else None
    card = engine.card if engine else None
    return VersionInfo(
        version=served.version,
        state=served.state.value,
        reason=served.reason,
        path=str(served.path),
        sha256=engine.sha256 if engine else None,
        provider=engine.provider if engine else None,
        input_size=engine.input_size if engine else None,
        num_classes=engine.num_classes if engine else None,
        embedding_dim=engine.embedding_dim if engine else None,
        preprocessing=card.preprocessing if card else None,
        arch=card.provenance.arch if card else None,
        trained=card.provenance.trained if card else None,
        test_time_augmentation=card.provenance.test_time_augmentation if card else None,
        precision=card.precision if card else None,
        batching=BatchingInfo(**vars(served.batching)),
        queue_depth=loaded.batcher.depth if loaded else 0,
        warmup_seconds=served.warmup_seconds,
    )
