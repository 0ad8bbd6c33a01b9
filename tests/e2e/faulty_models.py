"""Broken model files, made from a real exported model with the ``onnx`` package.

* :func:`poisoned` keeps the network and its model card but adds a data-dependent
  ``Gather``: when any image of a batch is (nearly) white, its index is out of bounds and
  ONNX Runtime fails the whole run, as a real graph fails on inputs it cannot take. On
  every other batch the outputs are exactly the original ones.
* :func:`truncated` and :func:`renamed_input` cannot be loaded or served at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metadata import ModelCard


def poisoned(source: Path, target: Path) -> None:
    model = onnx.load(str(source))
    graph = model.graph
    card = ModelCard.from_metadata_props({p.key: p.value for p in model.metadata_props})
    spec = card.preprocessing
    white = np.mean([(1.0 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])
    # floor(max image mean / threshold) is -1 or 0 for any image but a nearly white one.
    threshold = np.float32(0.97 * white)
    producer = next(node for node in graph.node if "logits" in node.output)
    producer.output[list(producer.output).index("logits")] = "logits_raw"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 2, 3], np.int64), "poison_axes"),
            numpy_helper.from_array(threshold, "poison_threshold"),
            numpy_helper.from_array(np.zeros(1, np.float32), "poison_table"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["input", "poison_axes"], ["image_mean"], keepdims=0),
            helper.make_node("ReduceMax", ["image_mean"], ["batch_max"], keepdims=0),
            helper.make_node("Div", ["batch_max", "poison_threshold"], ["scaled"]),
            helper.make_node("Floor", ["scaled"], ["floored"]),
            helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["poison_table", "index"], ["zero"], axis=0),
            helper.make_node("Add", ["logits_raw", "zero"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def truncated(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def renamed_input(source: Path, target: Path, name: str = "pixels") -> None:
    model = onnx.load(str(source))
    for node in model.graph.node:
        for i, value in enumerate(node.input):
            if value == "input":
                node.input[i] = name
    model.graph.input[0].name = name
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
