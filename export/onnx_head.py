"""Swapping the classifier of an exported graph: ``logits`` recomputed from ``embedding``.

The contract (:mod:`service.metadata`) says ``embedding`` is the pooled features that feed
the classifier. Whatever the graph does between the two (a Gemm; in an int8 QDQ variant a
Gemm with its weight dequantized and its output re-quantized; in an fp16 variant a Gemm
and a Cast; with flip TTA a Gemm on both halves and their average), the nodes that only
``logits`` needs are the old head. They are removed and one float32 Gemm,
``logits = embedding @ weight.T + bias``, takes their place; everything that computes
``embedding`` stays as it was, node for node, so the new head sees exactly the features
it was fitted on. Needs onnx and numpy only.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.errors import ExportError
from export.onnx_graph import subgraphs, tensor_names, unique_name
from service.metadata import EMBEDDING_NAME, LOGITS_NAME

log = logging.getLogger(__name__)

WEIGHT = "transfer_head.weight"
BIAS = "transfer_head.bias"


def embedding_width(proto: onnx.ModelProto) -> int:
    """D of the graph's float32 ``embedding`` [N, D] output, or a clear refusal."""
    outputs = {o.name: o for o in proto.graph.output}
    missing = [n for n in (LOGITS_NAME, EMBEDDING_NAME) if n not in outputs]
    if missing:
        raise ExportError(
            f"the graph has no {' or '.join(repr(m) for m in missing)} output (it has "
            f"{sorted(outputs)}); a new head needs the contract's 'logits' and 'embedding'"
        )
    tensor = outputs[EMBEDDING_NAME].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or not dims[1]:
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise ExportError(
            f"the 'embedding' output is not float32 [N, D] with a fixed D (it is "
            f"{helper.tensor_dtype_to_np_dtype(tensor.elem_type).name} [{shown}])"
        )
    return dims[1]


def replace_head(
    proto: onnx.ModelProto, weight: np.ndarray, bias: np.ndarray
) -> tuple[onnx.ModelProto, str]:
    """A copy of ``proto`` whose ``logits`` are ``embedding @ weight.T + bias``.

    ``weight`` is [K, D], ``bias`` [K]. Returns the new graph and what was replaced, e.g.
    ``"Gemm"`` or ``"2 DequantizeLinear, Gemm, QuantizeLinear"``.
    """
    width = embedding_width(proto)
    k = len(bias)
    if weight.shape != (k, width):
        raise ExportError(f"head weight {list(weight.shape)} does not fit [K={k}, D={width}]")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    keep = _ancestors(graph, [o.name for o in graph.output if o.name != LOGITS_NAME])
    if any(LOGITS_NAME in graph.node[i].output for i in keep):
        raise ExportError("'logits' feeds another output of the graph: cannot replace the head")
    replaced = _describe([n for i, n in enumerate(graph.node) if i not in keep])
    kept = _topological([n for i, n in enumerate(graph.node) if i in keep])
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused(graph)

    taken = tensor_names(graph)
    w_name, b_name = unique_name(WEIGHT, taken), unique_name(BIAS, taken)
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), w_name),
        numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), b_name),
    ])  # fmt: skip
    graph.node.append(helper.make_node(
        "Gemm", [EMBEDDING_NAME, w_name, b_name], [LOGITS_NAME], name="transfer_head", transB=1
    ))  # fmt: skip
    for i, output in enumerate(graph.output):
        if output.name == LOGITS_NAME:
            dims = output.type.tensor_type.shape.dim
            batch = (dims[0].dim_param or dims[0].dim_value or None) if dims else None
            graph.output[i].CopyFrom(
                helper.make_tensor_value_info(LOGITS_NAME, onnx.TensorProto.FLOAT, [batch, k])
            )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the graph with its new head is not valid ONNX: {exc}") from exc
    log.info("head: replaced %s between %r and %r by a Gemm [%d x %d]",
             replaced, EMBEDDING_NAME, LOGITS_NAME, k, width)  # fmt: skip
    return model, replaced


def _ancestors(graph: onnx.GraphProto, outputs: list[str]) -> set[int]:
    """The indices of the nodes that ``outputs`` depend on. Walked, not read off the order:
    an fp16 conversion appends the input's Cast after the nodes that read it."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed, seen = list(outputs), set(outputs)
    found: set[int] = set()
    while needed:
        i = producers.get(needed.pop())
        if i is None or i in found:
            continue
        found.add(i)
        for name in _reads(graph.node[i]):
            if name not in seen:
                seen.add(name)
                needed.append(name)
    return found


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the nodes it reads from, otherwise as
    they were. ONNX requires it; an fp16 conversion leaves the input's Cast last."""
    producers = {out: i for i, node in enumerate(nodes) for out in node.output}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producers[t] for t in _reads(node) if t in producers} - {i}:
            users[j].append(i)
            waiting[i] += 1
    ready = [i for i, n in enumerate(waiting) if not n]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in users[i]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise ExportError("the graph has a cycle: it is not a valid ONNX graph")
    return order


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads, those its subgraphs take from the outer graph included."""
    return {*node.input, *(t for sub in subgraphs(node) for t in tensor_names(sub))} - {""}


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the initializers (also where listed as inputs) and the shapes of tensors that
    no node reads or makes any more."""
    read = {o.name for o in graph.output}.union(*(_reads(n) for n in graph.node))
    dropped = {t.name for t in graph.initializer if t.name not in read}
    weights = [t for t in graph.initializer if t.name not in dropped]
    inputs = [v for v in graph.input if v.name not in dropped]
    produced = {o for n in graph.node for o in n.output}
    shapes = [v for v in graph.value_info if v.name in produced]
    for field, values in ((graph.initializer, weights), (graph.input, inputs)):
        del field[:]
        field.extend(values)
    del graph.value_info[:]
    graph.value_info.extend(shapes)


def _describe(nodes: list[onnx.NodeProto]) -> str:
    counts = sorted(Counter(n.op_type for n in nodes).items())
    return ", ".join(op if n == 1 else f"{n} {op}" for op, n in counts)
