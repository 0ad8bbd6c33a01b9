"""POST /embed: images in, feature vectors (the globally pooled layer before ``fc``) out."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.metadata import EMBEDDING_NAME
from service.postprocess import l2_normalize
from service.routes.deps import Context, ModelName, ModelVersion
from service.routes.images import REQUEST_BODY, json_response, run_images
from service.schemas import ERROR_RESPONSES, EmbedResponse

router = APIRouter(tags=["inference"])

NPY = "application/x-npy"
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
    openapi_extra=REQUEST_BODY,
    summary="Embed one or more images",
)
async def embed(
    request: Request,
    context: Context,
    model: ModelName = None,
    version: ModelVersion = None,
    normalize: Annotated[bool, Query(description="Return L2-normalized vectors.")] = False,
) -> Response:
    """One embedding per image, in request order, as JSON or as a .npy array."""
    served = context.registry.resolve(model, version)
    request.state.model = served.name
    outputs = await run_images(request, served, context)
    vectors = np.stack([out[EMBEDDING_NAME] for out in outputs])
    if normalize:
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
