"""POST /predict: images in, top-k labels with softmax scores out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.engine import PROBABILITIES_NAME, RANKING_NAME
from service.errors import InvalidParameter
from service.postprocess import top_predictions
from service.routes.deps import Context, ModelName, ModelVersion
from service.routes.images import REQUEST_BODY, json_response, run_images
from service.schemas import ERROR_RESPONSES, PredictResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=REQUEST_BODY,
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    context: Context,
    model: ModelName = None,
    version: ModelVersion = None,
    top_k: Annotated[int, Query(ge=1, description="Classes per image, best first.")] = 5,
) -> Response:
    """The ``top_k`` most probable classes of each image, in request order."""
    served = context.registry.resolve(model, version)
    request.state.model = served.name
    labels = served.engine.card.labels if served.engine else ()
    if top_k > len(labels):
        raise InvalidParameter(
            f"top_k must be between 1 and {len(labels)} (the classes of model "
            f"{served.name!r}), got {top_k}"
        )
    outputs = await run_images(request, served, context)
    results = [
        {"predictions": top_predictions(out[PROBABILITIES_NAME], top_k, labels, out[RANKING_NAME])}
        for out in outputs
    ]
    return json_response({"model": served.name, "version": served.version, "results": results})
