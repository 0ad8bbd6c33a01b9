"""A model with a ResNet's contract and almost no compute, to measure the service alone.

``input`` float32 [N, 3, S, S] -> global average pool -> ``embedding`` [N, 3] -> one
linear layer -> ``logits`` [N, 1000]: the same preprocessing, JPEG decoding, HTTP, batching
and outputs as an ImageNet ResNet, with the engine's share of the time close to zero. What
it serves per second is what the service itself can carry (``python -m tools.bench
--null``).

``python -m tools.null_model --out DIR`` writes ``DIR/null/1/model.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metadata import (
    EMBEDDING_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    ModelCard,
    Preprocessing,
    Provenance,
)

NAME = "null"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_null_model(root: Path, *, name: str = NAME, size: int = 224, classes: int = 1000) -> Path:
    """Write ``root/name/1/model.onnx`` and return its path."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((classes, 3)).astype(np.float32)
    bias = np.zeros(classes, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], [EMBEDDING_NAME], axis=1),
            helper.make_node("Gemm", [EMBEDDING_NAME, "w", "b"], [LOGITS_NAME], transB=1),
        ],
        "null",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = ModelCard(
        labels=tuple(f"class_{i}" for i in range(classes)),
        preprocessing=Preprocessing(
            resize=round(size / 0.875), crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        provenance=Provenance(
            arch="null (global average pool + linear)",
            source="custom",
            trained=False,
            opset=17,
            exporter_version="tools.null_model",
            exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )
    onnx.helper.set_model_props(model, card.to_metadata_props())
    onnx.checker.check_model(model)
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.null_model", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="model repository")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    args = parser.parse_args(argv)
    print(write_null_model(args.out, size=args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
