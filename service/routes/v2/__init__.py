"""The Open Inference Protocol (KServe v2) over REST, for tritonclient, KServe and load tools.

Three routers: :mod:`.metadata` (health, server and model metadata, model configuration),
:mod:`.infer` (inference, JSON and binary tensor data, classification; onto the same data
plane as /predict) and :mod:`.repository` (the model-repository extension, whose load and
unload are off unless ``model_control`` is 'explicit'). Errors under /v2 come back as the
protocol's ``{"error": "..."}`` (``service.errors.error_body``). The protocol's codec and
schemas are in :mod:`service.v2`.
"""

from fastapi import APIRouter

from service.routes.v2 import infer, metadata, repository

router = APIRouter()
for _module in (metadata, infer, repository):
    router.include_router(_module.router)
