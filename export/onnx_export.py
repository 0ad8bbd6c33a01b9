"""PyTorch module -> ONNX graph with a dynamic batch dimension, standard ops only.

We use torch 2.x's default exporter (``torch.onnx.export(..., dynamo=True)``: torch.export
then onnxscript). The TorchScript exporter it replaces is deprecated; the dynamo path
yields static shapes for every non-batch dimension (the embedding width stays a number,
not a symbol), and its onnxscript optimizer folds constants, so the graph holds only
standard ops that ONNX Runtime's CPU and CUDA providers both run.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export.errors import ExportError
from service.metadata import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
"""Supported by ONNX Runtime's CPU and CUDA providers alike (ORT >= 1.14)."""
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so trace with 2


def exporter_name() -> str:
    import onnxscript

    return f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {onnxscript.__version__})"


def to_onnx(model: nn.Module, *, input_size: int, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (returning ``(logits, embedding)``) for [N, 3, input_size, input_size]."""
    example = torch.randn(_EXAMPLE_BATCH, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours
            program = torch.onnx.export(
                model.eval(),
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, EMBEDDING_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                optimize=True,  # onnxscript's optimizer: constant folding, dead code removal
                external_data=False,
                verbose=False,
            )
    except ExportError:
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    check_graph(proto)
    return proto


def check_graph(proto: onnx.ModelProto) -> None:
    """Fail unless the graph is valid ONNX with standard ops and the expected I/O names."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node} - _standard(proto))
    if custom:
        raise ExportError(f"the exported graph uses non-standard ops: {', '.join(custom)}")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [LOGITS_NAME, EMBEDDING_NAME]:
        raise ExportError(f"exported graph has inputs {inputs} and outputs {outputs}")


def _standard(proto: onnx.ModelProto) -> set[str]:
    return {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain in STANDARD_DOMAINS}


def graph_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS)


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``props``."""
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)


def save(proto: onnx.ModelProto, path: Path) -> None:
    """Write atomically: a reader never sees a half-written model.onnx."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, path)
