"""The model card: what an exported ONNX file says about itself.

This module is the contract between the two halves of the project. The export stage
writes a :class:`ModelCard` into the ``metadata_props`` of every ONNX file it produces;
the service reads it back and needs nothing else to serve the model correctly. It
depends only on pydantic, so both sides import it (the service never imports torch).

Each top-level field is stored as one JSON string under its own key, so that the file
stays readable with ``onnx`` or Netron.

How the card may evolve: ``FORMAT`` names the contract (``resnet-serve/<major>``). A change
that an older server can ignore or that has a default for older files keeps the major:
a new optional field or key, a new value of a Literal that a file only carries when it
uses the feature. Every model of the card is ``extra="forbid"``, so an older server
refuses a file with a field it does not know (a clear "malformed" load error, never a
silently wrong answer); that is the price of the strictness, and why a new field is
only written when it is not at its default. A change that alters what an existing field
means, removes one or changes the tensor names below bumps the major, and this module
then reads both majors for as long as files of the old one are served.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "resnet-serve/1"
"""Value of the ``format`` key; its major is bumped when the card changes incompatibly."""

# The tensor names of the contract. The ONNX graph has one input and two outputs:
INPUT_NAME = "input"
"""float32 [N, 3, crop, crop], preprocessed as the card's ``preprocessing`` says."""
LOGITS_NAME = "logits"
"""float32 [N, num_classes], in the order of the card's ``labels``."""
EMBEDDING_NAME = "embedding"
"""float32 [N, D]: the globally pooled features that feed the classifier."""
# The engine derives two more from the logits, once per batch (service.engine):
PROBABILITIES_NAME = "probabilities"
"""float32 [N, num_classes]: the softmax of the logits."""
RANKING_NAME = "ranking"
"""int64 [N, num_classes]: class indices, most probable first (ties: lower index first)."""
GRAPH_OUTPUTS = (LOGITS_NAME, EMBEDDING_NAME)
"""The outputs every exported graph has."""
OUTPUT_NAMES = (LOGITS_NAME, PROBABILITIES_NAME, EMBEDDING_NAME)
"""The outputs a client may ask for by name (the v2 protocol's model metadata)."""

_KEYS = ("labels", "preprocessing", "provenance", "verification", "quantization")

CropRounding = Literal["half_even", "floor"]
"""How the centre crop's offset ``(side - crop) / 2`` is rounded when the margin is odd."""

TestTimeAugmentation = Literal["none", "flip"]
"""What the graph adds to the preprocessing: 'flip' averages each image with its mirror."""


class MetadataError(ValueError):
    """An ONNX file lacks a model card, or carries one this version cannot read."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(_Frozen):
    """The eval transform, in torchvision's terms.

    ``Resize(resize)`` (shorter side, antialiased) -> ``CenterCrop(crop)`` -> ``ToTensor()``
    -> ``Normalize(mean, std)``. ``resize == crop`` skips the crop for square inputs.
    ``crop_rounding`` 'floor' starts the crop at ``(side - crop) // 2`` instead of
    torchvision's ``round((side - crop) / 2)``, as transformers' image processors do; a
    crop larger than the image is padded ``(crop - side) // 2`` before in both cases.
    """

    resize: int = Field(gt=0, description="Shorter side after resizing, in pixels.")
    crop: int = Field(gt=0, description="Side of the square center crop fed to the model.")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    crop_rounding: CropRounding = Field(
        default="half_even",
        description="How the centre crop's offset is rounded when the margin is odd: "
        "torchvision's half to even, or transformers' floor.",
    )


class Provenance(_Frozen):
    """Where the weights came from and how the file was made."""

    arch: str
    source: Literal["torchvision", "cifar", "custom", "timm", "transformers", "onnx"]
    weights: str | None = Field(
        default=None,
        description="torchvision weights name or pretrained tag, or the weights file's name.",
    )
    checkpoint_sha256: str | None = None
    library: str | None = Field(
        default=None,
        description="The library the model came from and its version, e.g. 'timm 1.0.31'.",
    )
    config_sha256: str | None = Field(
        default=None, description="SHA-256 of the Hub folder's config.json, for a folder."
    )
    trained: bool
    opset: int
    exporter_version: str
    torch_version: str | None = Field(
        default=None, description="None for an ONNX file adopted without PyTorch."
    )
    exported_at: str = Field(description="UTC time of the export, ISO 8601.")
    test_time_augmentation: TestTimeAugmentation = Field(
        default="none",
        description="'flip': the graph averages each image with its mirror (2x the compute).",
    )


class Verification(_Frozen):
    """The reference versus ONNX Runtime on the same inputs, measured at export time.

    The reference is the PyTorch model, or for an adopted ONNX file the original file.
    """

    inputs: str = Field(description="What was fed: 'random' or the image folder used.")
    batch_sizes: tuple[int, ...]
    max_abs_diff_logits: float
    max_rel_diff_logits: float
    max_abs_diff_embedding: float
    max_rel_diff_embedding: float
    top1_agreement: float = Field(ge=0.0, le=1.0)
    tolerance: float


Precision = Literal["fp32", "int8", "fp16"]
"""The arithmetic of a model's weights and compute; its inputs and outputs are float32."""


class Agreement(_Frozen):
    """A precision variant against its source model on the same images, as served."""

    on: str = Field(description="The images: an --eval folder or held-back calibration images.")
    images: int = Field(ge=1)
    top1_agreement: float = Field(ge=0.0, le=1.0)
    max_abs_logit_error: float
    mean_abs_logit_error: float
    source_accuracy: float | None = Field(default=None, description="On a labelled --eval set.")
    accuracy: float | None = None


class Quantization(_Frozen):
    """How a reduced-precision variant was made from its source (``python -m export.quantize``)."""

    precision: Literal["int8", "fp16"]
    source_sha256: str
    method: str
    format: str
    reduce_range: bool | None = None
    calibration_images: int | None = None
    calibration_sha256: str | None = Field(
        default=None, description="SHA-256 over the calibration images' bytes, in order."
    )
    excluded_nodes: tuple[str, ...] = ()
    onnxruntime_version: str
    agreement: Agreement


class ModelCard(_Frozen):
    """Everything the service needs to know about a model beyond its graph."""

    labels: tuple[str, ...] = Field(min_length=1)
    preprocessing: Preprocessing
    provenance: Provenance
    verification: Verification | None = None
    quantization: Quantization | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def precision(self) -> Precision:
        """fp32 unless the file is a variant made by ``python -m export.quantize``."""
        return self.quantization.precision if self.quantization else "fp32"

    def to_metadata_props(self) -> dict[str, str]:
        """The card as ONNX ``metadata_props`` (string to string)."""
        props = {"format": FORMAT}
        for key in _KEYS:
            value = getattr(self, key)
            if value is not None:
                # Fields at their default stay out, so older servers read newer files
                # that do not use a newer field (see the module docstring).
                props[key] = json.dumps(
                    value
                    if key == "labels"
                    else value.model_dump(mode="json", exclude_defaults=True),
                    separators=(",", ":"),
                )
        return props

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str]) -> ModelCard:
        """Read a card back from ``metadata_props`` or ORT's ``custom_metadata_map``."""
        found = props.get("format")
        if found != FORMAT:
            raise MetadataError(
                f"model metadata 'format' is {found!r}, expected {FORMAT!r}: "
                "was this file written by `python -m export`?"
            )
        try:
            fields = {key: json.loads(props[key]) for key in _KEYS if key in props}
            return cls.model_validate(fields)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise MetadataError(f"model metadata is malformed: {exc}") from exc
