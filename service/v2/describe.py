"""What the v2 protocol says about models: metadata, Triton-style config, repository index."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from service.engine import CUDA
from service.metadata import INPUT_NAME, OUTPUT_NAMES
from service.registry import ModelRegistry, ServedModel, State
from service.repository import ModelEntry
from service.v2.codec import BYTES
from service.v2.inference import FP32, IMAGE_NAME
from service.v2.schemas import (
    ConfigTensor,
    DynamicBatching,
    InstanceGroup,
    ModelConfig,
    ModelMetadata,
    QueuePolicy,
    RepositoryIndexEntry,
    Reshape,
    StringParameter,
    TensorMetadata,
)

PLATFORM = "onnxruntime_onnx"
"""Triton's platform name for ONNX Runtime models."""


def _output_widths(served: ServedModel) -> dict[str, int]:
    engine = served.require_loaded().engine
    widths = (engine.num_classes, engine.num_classes, engine.embedding_dim)
    return dict(zip(OUTPUT_NAMES, widths, strict=True))


def model_metadata(served: ServedModel, versions: list[int]) -> ModelMetadata:
    """Inputs and outputs with datatype and shape; -1 is the batch dimension."""
    engine = served.require_loaded().engine
    size = engine.input_size
    return ModelMetadata(
        name=served.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=INPUT_NAME, datatype=FP32, shape=[-1, 3, size, size]),
            TensorMetadata(name=IMAGE_NAME, datatype=BYTES, shape=[-1]),
        ],
        outputs=[
            TensorMetadata(name=name, datatype=FP32, shape=[-1, width])
            for name, width in _output_widths(served).items()
        ],
        parameters={"precision": engine.card.precision},
    )


def model_config(served: ServedModel) -> ModelConfig:
    """The model as a Triton config: dims exclude the batch dimension, as Triton's do."""
    engine = served.require_loaded().engine
    size = engine.input_size
    batching = served.batching
    card = engine.card
    return ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=batching.max_batch_size,
        input=[
            # Both optional: a request sends one of the two.
            ConfigTensor(
                name=INPUT_NAME,
                data_type="TYPE_FP32",
                format="FORMAT_NCHW",
                dims=[3, size, size],
                optional=True,
            ),
            # One encoded file per batch item: Triton spells that dims [1], reshaped to [].
            ConfigTensor(
                name=IMAGE_NAME,
                data_type="TYPE_STRING",
                dims=[1],
                reshape=Reshape(shape=[]),
                optional=True,
            ),
        ],
        output=[
            ConfigTensor(name=name, data_type="TYPE_FP32", dims=[width])
            for name, width in _output_widths(served).items()
        ],
        dynamic_batching=DynamicBatching(
            max_queue_delay_microseconds=round(batching.max_delay_ms * 1000),
            default_queue_policy=QueuePolicy(max_queue_size=batching.max_queue_size),
        ),
        instance_group=[
            InstanceGroup(
                name=served.name,
                count=batching.instances,
                kind="KIND_GPU" if engine.provider == CUDA else "KIND_CPU",
            )
        ],
        parameters={
            "labels": StringParameter(string_value=json.dumps(list(card.labels))),
            "preprocessing": StringParameter(string_value=card.preprocessing.model_dump_json()),
            "precision": StringParameter(string_value=card.precision),
        },
    )


def repository_index(
    registry: ModelRegistry, on_disk: Mapping[str, ModelEntry], *, ready_only: bool
) -> list[RepositoryIndexEntry]:
    """Every version in the repository directory or being served, with its state."""
    entries = []
    for name in sorted(set(on_disk) | set(registry.models)):
        served = registry.models.get(name, {})
        versions = set(served) | (set(on_disk[name].versions) if name in on_disk else set())
        for version in sorted(versions):
            model = served.get(version)
            state: Literal["READY", "LOADING", "UNAVAILABLE"]
            if model is None:
                state, reason = "UNAVAILABLE", "unloaded"
            elif model.state is State.READY:
                state, reason = "READY", ""
            elif model.state is State.LOADING:
                state, reason = "LOADING", model.reason
            else:
                state, reason = "UNAVAILABLE", model.reason
            if state == "READY" or not ready_only:
                entries.append(
                    RepositoryIndexEntry(
                        name=name, version=str(version), state=state, reason=reason
                    )
                )
    return entries
