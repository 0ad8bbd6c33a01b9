"""Response bodies, as pydantic models: the OpenAPI document at /docs is the contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.metadata import Precision, Preprocessing, TestTimeAugmentation


class Prediction(BaseModel):
    index: int = Field(description="Class index, as in the model's logits.")
    label: str
    score: float = Field(description="Softmax probability.")


class PredictResult(BaseModel):
    predictions: list[Prediction] = Field(description="The top_k classes, best first.")


class PredictResponse(BaseModel):
    model: str
    version: int
    results: list[PredictResult] = Field(description="One per image, in request order.")


class EmbedResult(BaseModel):
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    version: int
    dim: int = Field(description="Length of each embedding.")
    results: list[EmbedResult] = Field(description="One per image, in request order.")


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_queue_size: int
    instances: int = Field(description="Batches of this version that may run at once.")


class VersionInfo(BaseModel):
    version: int
    state: Literal["loading", "ready", "failed", "unloaded"]
    reason: str
    path: str
    sha256: str | None = None
    provider: str | None = Field(None, description="ONNX Runtime provider in use.")
    input_size: int | None = Field(None, description="Side of the square model input.")
    num_classes: int | None = None
    embedding_dim: int | None = None
    preprocessing: Preprocessing | None = None
    arch: str | None = None
    trained: bool | None = None
    test_time_augmentation: TestTimeAugmentation | None = Field(
        None, description="'flip': the model averages each image with its mirror."
    )
    precision: Precision | None = Field(
        None, description="fp32, or a variant made by python -m export.quantize (int8, fp16)."
    )
    batching: BatchingInfo
    queue_depth: int = 0
    warmup_seconds: float | None = None


class ModelInfo(BaseModel):
    name: str
    latest_version: int
    default: bool = Field(description="Whether requests without ?model= go to this model.")
    versions: list[VersionInfo]
    labels: list[str] | None = Field(None, description="Class labels of the latest version.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    ready: bool
    reason: str
    models: dict[str, str] = Field(
        default_factory=dict, description="'name/version' -> state of each model version."
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'invalid_image'.")
    message: str = Field(description="What was wrong and what is allowed.")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Bad request (e.g. several models served and none chosen, malformed multipart)",
        404: "Unknown model or version",
        413: "Body, image or image count over the limits",
        415: "Not an image, or an unsupported Content-Type",
        422: "Invalid parameter, or an image that cannot be decoded",
        500: "The engine failed on this request's batch",
        503: "Model not ready, queue full (with Retry-After) or shutting down",
    }.items()
}
"""The error statuses of the inference routes, for the OpenAPI document."""
