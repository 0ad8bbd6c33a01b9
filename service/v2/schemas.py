"""Bodies of the Open Inference Protocol (KServe v2) REST API, as pydantic models.

Field names follow the protocol (and Triton's extensions) exactly, so that the OpenAPI
document at /docs is the contract that tritonclient, KServe and load tools rely on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Parameters(BaseModel):
    """A protocol ``parameters`` object: known keys typed, others kept (and mostly ignored)."""

    model_config = ConfigDict(extra="allow")

    def extra_keys(self) -> list[str]:
        return list(self.model_extra or {})


class InputParameters(_Parameters):
    binary_data_size: int | None = Field(
        default=None, ge=0, description="Bytes of this input in the binary section after the JSON."
    )


class OutputParameters(_Parameters):
    binary_data: bool | None = Field(
        default=None, description="Return this output in the binary section (default: JSON data)."
    )
    classification: int | None = Field(
        default=None,
        ge=1,
        description="Return the top k classes as BYTES '<value>:<index>:<label>'.",
    )


class RequestParameters(_Parameters):
    binary_data_output: bool = Field(
        default=False, description="Default of binary_data for every output."
    )


class _WithParameters(BaseModel):
    """Has a ``parameters`` object, which clients may also send as ``null``."""

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return {} if value is None else value


class RequestInput(_WithParameters):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES.")
    parameters: InputParameters = Field(default_factory=InputParameters)
    data: Any = Field(
        default=None,
        description="Row-major elements, flat or nested as the shape. BYTES elements are "
        "strings (for the `image` input: base64 of the image file).",
    )


class RequestOutput(_WithParameters):
    name: str
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class InferRequest(_WithParameters):
    """``POST /v2/models/{model}/infer``: the JSON object (the binary data follows it)."""

    id: str | None = None
    parameters: RequestParameters = Field(default_factory=RequestParameters)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(
        default=None, description="Outputs to return (default: every output)."
    )


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size when the data is in the binary section."
    )
    data: list[Any] | None = Field(default=None, description="Row-major, flat.")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 is the batch dimension.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str] = Field(
        default_factory=dict,
        description="The protocol's optional parameters: 'precision' (fp32, int8 or fp16).",
    )


class ServerLive(BaseModel):
    live: bool = True


class ServerReady(BaseModel):
    ready: bool = True


class ModelReady(BaseModel):
    name: str
    ready: bool = True


class Reshape(BaseModel):
    shape: list[int]


class ConfigTensor(BaseModel):
    """One input or output in Triton's model-configuration terms (dims exclude the batch)."""

    name: str
    data_type: str
    dims: list[int]
    format: str | None = None
    reshape: Reshape | None = None
    optional: bool | None = None


class QueuePolicy(BaseModel):
    max_queue_size: int


class DynamicBatching(BaseModel):
    max_queue_delay_microseconds: int
    default_queue_policy: QueuePolicy


class InstanceGroup(BaseModel):
    name: str
    count: int
    kind: Literal["KIND_CPU", "KIND_GPU"]


class StringParameter(BaseModel):
    string_value: str


class ModelConfig(BaseModel):
    """``GET /v2/models/{model}/config``: Triton's model configuration, as load tools read it."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: DynamicBatching
    instance_group: list[InstanceGroup]
    parameters: dict[str, StringParameter] = Field(
        description="labels and preprocessing (JSON strings), from the model card."
    )


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(default=False, description="List only the versions ready for inference.")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str


class RepositoryModelRequest(BaseModel):
    """Body of a load or unload request (optional)."""

    parameters: dict[str, Any] = Field(default_factory=dict)


class V2Error(BaseModel):
    """The protocol's error body: every /v2 error, whatever its status."""

    error: str


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": description}
    for status, description in {
        400: "Bad request: malformed JSON, unknown input or output, bad shape, datatype or data",
        404: "Unknown model or version",
        413: "Body or batch over the limits",
        500: "The engine failed on this request's batch",
        503: "Model not ready, queue full (with Retry-After) or shutting down",
    }.items()
}
"""The error statuses of the v2 routes, for the OpenAPI document."""


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for an ``openapi_extra`` body.

    FastAPI documents a request body it parses itself; the infer route reads the raw body
    (JSON then binary), so its schema is given by hand and must stand alone.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result
