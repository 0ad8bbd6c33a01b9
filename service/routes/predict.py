"""POST /predict: images in, top-k labels with softmax scores out."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import Field

from service.errors import InvalidParameter
from service.metadata import PROBABILITIES_NAME, RANKING_NAME
from service.postprocess import top_predictions
from service.routes.deps import IMAGES_BODY, DirectRoute, QueryParams, context_of, json_response
from service.schemas import ERROR_RESPONSES, PredictResponse

DEFAULT_TOP_K = 5
router = APIRouter(tags=["inference"], route_class=DirectRoute)


class PredictParams(QueryParams):
    top_k: int | None = Field(
        None,
        ge=1,
        description="Classes per image, best first (default: 5, or every class of a model "
        "with fewer).",
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={**IMAGES_BODY, "parameters": PredictParams.openapi()},
    summary="Classify one or more images",
)
async def predict(request: Request) -> Response:
    """The ``top_k`` most probable classes of each image, in request order."""
    params, context = PredictParams.parse(request), context_of(request)
    served = context.registry.resolve(params.model, params.version)
    request.state.model = served.name
    labels = served.require_loaded().engine.card.labels
    top_k = params.top_k or min(DEFAULT_TOP_K, len(labels))
    if top_k > len(labels):
        raise InvalidParameter(
            f"top_k must be between 1 and {len(labels)} (the classes of model "
            f"{served.name!r}), got {top_k}"
        )
    outputs = await context.dataplane.run_request(request, served)
    results = [
        {"predictions": top_predictions(out[PROBABILITIES_NAME], top_k, labels, out[RANKING_NAME])}
        for out in outputs
    ]
    return json_response({"model": served.name, "version": served.version, "results": results})
