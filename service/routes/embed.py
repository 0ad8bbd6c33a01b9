"""POST /embed: images in, feature vectors (the globally pooled layer before ``fc``) out."""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import Field

from service.metadata import EMBEDDING_NAME
from service.postprocess import l2_normalize
from service.routes.deps import IMAGES_BODY, DirectRoute, QueryParams, context_of, json_response
from service.schemas import ERROR_RESPONSES, EmbedResponse

router = APIRouter(tags=["inference"], route_class=DirectRoute)

NPY = "application/x-npy"


class EmbedParams(QueryParams):
    normalize: bool = Field(False, description="Return L2-normalized vectors.")


_RESPONSES: dict[int | str, dict[str, object]] = {
    **ERROR_RESPONSES,
    200: {
        "description": f"JSON, or with `Accept: {NPY}` one float32 .npy array of shape [N, D]",
        "content": {NPY: {"schema": {"type": "string", "format": "binary"}}},
    },
}


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=_RESPONSES,
    openapi_extra={**IMAGES_BODY, "parameters": EmbedParams.openapi()},
    summary="Embed one or more images",
)
async def embed(request: Request) -> Response:
    """One embedding per image, in request order, as JSON or as a .npy array."""
    params, context = EmbedParams.parse(request), context_of(request)
    served = context.registry.resolve(params.model, params.version)
    request.state.model = served.name
    outputs = await context.dataplane.run_request(request, served)
    vectors = np.stack([out[EMBEDDING_NAME] for out in outputs])
    if params.normalize:
        vectors = l2_normalize(vectors)
    if NPY in request.headers.get("accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, vectors.astype(np.float32, copy=False), allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY)
    return json_response(
        {
            "model": served.name,
            "version": served.version,
            "dim": vectors.shape[1],
            "results": [{"embedding": row} for row in vectors.tolist()],
        }
    )
