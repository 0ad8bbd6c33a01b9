"""Reading a classifier graph another tool wrote, and rewriting it to the service's contract.

:func:`find_head` locates the three tensors the contract names, whatever the file calls
them: the one float image input [N, 3, H, W], the logits [N, C] (the input of a trailing
Softmax when the file ends in probabilities) and the embedding, i.e. the input of the final
fully connected layer (Gemm, or MatMul with or without Add). :func:`contract_graph` keeps
only what computes the logits and the embedding, renames the three tensors to ``input``,
``logits`` and ``embedding`` and, when asked, frees the batch dimension of a file exported
at a fixed batch. Needs onnx and numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.errors import ExportError
from service.metadata import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME

log = logging.getLogger(__name__)

Dim = int | str | None
"""A static size, a symbolic one (its name), or unknown."""
BATCH = "batch"
STANDARD_DOMAINS = ("", "ai.onnx")
FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class Head:
    """Where the contract's tensors are in a foreign graph, by their names there."""

    input: str
    batch: int | None
    """The input's fixed batch size; None when it is already symbolic."""
    size: int | None
    """The input's side when its height and width are static (they are then equal)."""
    logits: str
    softmax: str | None
    """The op type of a trailing Softmax/LogSoftmax whose input is taken as the logits."""
    embedding: str


def opset(proto: onnx.ModelProto) -> int:
    """The version of the standard operator set the graph imports."""
    found = [o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS]
    if not found:
        raise ExportError("the graph imports no standard ONNX operator set")
    return found[0]


def describe(value: onnx.ValueInfoProto, dims: list[Dim] | None = None) -> str:
    """``'data' float32 [1, 3, 224, 224]`` for an error message."""
    elem = value.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem).name if elem else "tensor"
    shown = ", ".join("?" if d is None else str(d) for d in dims or _dims(value))
    return f"{value.name!r} {dtype} [{shown}]"


def find_head(proto: onnx.ModelProto, *, num_labels: int) -> Head:
    """The image input, the logits and the embedding of ``proto``, or a clear refusal."""
    graph = proto.graph
    shapes = inferred_shapes(proto)
    x, batch, size = _image_input(graph)
    logits = output = _logits_output(graph, shapes, num_labels)
    producers = {out: node for node in graph.node for out in node.output}
    node = _producer(producers, logits)
    softmax = None
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        softmax, logits = node.op_type, node.input[0]
        log.info("output %r is a %s: its input %r is the logits", output, softmax, logits)
        node = _producer(producers, logits)
    fc, embedding = _final_layer(graph, node, logits)
    dims = shapes.get(embedding)
    if dims is not None and len(dims) != 2:
        raise ExportError(
            f"the input of the final {fc} ({embedding!r}) has rank {len(dims)}, "
            "not [N, D]: cannot use it as the embedding"
        )
    behind = _producer(producers, embedding)
    log.info(
        "input %s, logits %r from %s, embedding %r (the input of the %s, from %s)",
        describe(x), logits, fc, embedding, fc, behind.op_type if behind else "the input",
    )  # fmt: skip
    return Head(x.name, batch, size, logits, softmax, embedding)


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the tensors ``names`` (nothing else changes)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def contract_graph(
    proto: onnx.ModelProto, head: Head, *, dynamic: bool, crop: int, num_classes: int, dim: int
) -> onnx.ModelProto:
    """``proto`` rewritten to the contract: ``input`` -> ``logits`` [N, C], ``embedding`` [N, D].

    ``dynamic`` makes a fixed batch dimension symbolic, rewriting the Reshape targets that
    repeat it; whether the result really runs at other batch sizes is for the caller to check.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    shapes = inferred_shapes(proto) if dynamic and head.batch is not None else {}
    del graph.input[:], graph.output[:]  # the input is added back below, with its new shape
    model.ir_version = max(model.ir_version, 4)  # initializers need not be inputs from IR 4
    del graph.value_info[:]  # stale shapes (a baked batch); ONNX Runtime infers them again
    if shapes and head.batch is not None:
        for change in _free_batch(graph, head.input, head.batch, shapes):
            log.info("batch: Reshape %s", change)
    _prune(graph, (head.logits, head.embedding))  # also drops the targets rewritten
    _rename(
        graph, {head.input: INPUT_NAME, head.logits: LOGITS_NAME, head.embedding: EMBEDDING_NAME}
    )
    batch: Dim = BATCH if dynamic or head.batch is None else head.batch
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, FLOAT, [batch, 3, crop, crop]))
    graph.output.extend([
        helper.make_tensor_value_info(LOGITS_NAME, FLOAT, [batch, num_classes]),
        helper.make_tensor_value_info(EMBEDDING_NAME, FLOAT, [batch, dim]),
    ])  # fmt: skip
    return model


def inferred_shapes(proto: onnx.ModelProto) -> dict[str, list[Dim]]:
    """Every tensor's shape that ONNX shape inference can tell (graph inputs and outputs too)."""
    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.debug("shape inference failed: %s", exc)
        graph = proto.graph
    values = [*graph.input, *graph.value_info, *graph.output]
    return {v.name: _dims(v) for v in values if v.type.tensor_type.HasField("shape")}


def _dims(value: onnx.ValueInfoProto) -> list[Dim]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in value.type.tensor_type.shape.dim
    ]


def _image_input(graph: onnx.GraphProto) -> tuple[onnx.ValueInfoProto, int | None, int | None]:
    weights = {i.name for i in graph.initializer}
    feeds = [i for i in graph.input if i.name not in weights]
    if len(feeds) != 1:
        found = "; ".join(describe(i) for i in feeds) or "none"
        raise ExportError(
            f"the graph has {len(feeds)} inputs ({found}); adoption needs exactly one, "
            "the float32 image [N, 3, H, W]"
        )
    x = feeds[0]
    dims = _dims(x)
    if x.type.tensor_type.elem_type != FLOAT or len(dims) != 4:
        raise ExportError(f"input {describe(x)} is not a float32 image batch [N, 3, H, W]")
    n, c, h, w = dims
    if c != 3:
        layout = "an NHWC (channels-last) input" if w == 3 else f"{c} channels"
        raise ExportError(
            f"input {describe(x)} has {layout}; the service feeds NCHW float32 [N, 3, H, W]"
        )
    if isinstance(h, int) and isinstance(w, int) and h != w:
        raise ExportError(f"input {describe(x)} is not square; the service feeds square crops")
    size = h if isinstance(h, int) and h == w else None
    return x, n if isinstance(n, int) else None, size


def _logits_output(graph: onnx.GraphProto, shapes: dict[str, list[Dim]], num_labels: int) -> str:
    """The one float output of rank 2, or of those the one with ``num_labels`` columns."""
    dims = {o.name: _dims(o) or shapes.get(o.name) or [] for o in graph.output}
    found = [o for o in graph.output if o.type.tensor_type.elem_type == FLOAT]
    candidates = [o for o in found if len(dims[o.name]) == 2]
    if len(candidates) > 1:
        candidates = [o for o in candidates if dims[o.name][1] == num_labels]
    if len(candidates) == 1:
        return candidates[0].name
    listed = "; ".join(describe(o, dims[o.name]) for o in graph.output) or "none"
    if not candidates and not any(len(dims[o.name]) == 2 for o in found):
        raise ExportError(f"no output looks like logits [N, classes]; outputs: {listed}")
    raise ExportError(
        f"cannot tell which output is the logits: outputs {listed}; "
        f"expected exactly one float32 [N, {num_labels}] (as many columns as labels)"
    )


def _producer(producers: dict[str, onnx.NodeProto], name: str) -> onnx.NodeProto | None:
    """The node that computes ``name``, looking through Identity nodes."""
    node = producers.get(name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    return node


def _final_layer(
    graph: onnx.GraphProto, node: onnx.NodeProto | None, logits: str
) -> tuple[str, str]:
    """(what the final fully connected layer is, its input: the embedding)."""
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {out: n for n in graph.node for out in n.output}
    fc = "Gemm"
    if node is not None and node.op_type == "Add":
        matmuls = [producers.get(i) for i in node.input if i not in constants]
        if len(matmuls) == 1 and matmuls[0] is not None and matmuls[0].op_type == "MatMul":
            fc, node = "MatMul+Add", matmuls[0]
    elif node is not None and node.op_type == "MatMul":
        fc = "MatMul"
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.input[1] not in constants:
        found = f"a {node.op_type} node" if node is not None else "no node"
        raise ExportError(
            f"the logits {logits!r} come from {found}, not from a final fully connected layer "
            "(Gemm, or MatMul with constant weights and an optional Add): cannot find the "
            "embedding that feeds it"
        )
    if any(a.name == "transA" and a.i for a in node.attribute):
        raise ExportError(f"the final Gemm transposes its input (transA=1): {node.input[0]!r}")
    return fc, node.input[0]


def _prune(graph: onnx.GraphProto, outputs: Iterable[str]) -> None:
    """Drop the nodes and initializers that none of ``outputs`` depends on."""
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):  # nodes are in topological order
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(name for sub in subgraphs(node) for n in sub.node for name in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    weights = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(weights)


def _free_batch(
    graph: onnx.GraphProto, x: str, batch: int, shapes: dict[str, list[Dim]]
) -> Iterator[str]:
    """Rewrite each Reshape target that repeats the fixed batch size of a tensor fed by ``x``.

    ``[1, 512]`` becomes ``[-1, 512]``; ``[1, -1]`` becomes ``[0, -1]`` (0: copy the input's
    dimension) unless the node sets ``allowzero``. Yields what it changed.
    """
    fed = {x}
    taken = tensor_names(graph)
    for node in graph.node:
        if not fed.intersection(node.input):
            continue
        fed.update(node.output)
        if node.op_type != "Reshape" or (shapes.get(node.input[0]) or [None])[0] != batch:
            continue
        target = _constant(graph, node.input[1])
        if target is None or target.ndim != 1 or not len(target) or target[0] != batch:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        rewritten = target.copy()
        if -1 not in target:
            rewritten[0] = -1
        elif not allowzero:
            rewritten[0] = 0
        else:
            continue
        name = unique_name(f"{node.input[1]}_batch", taken)
        graph.initializer.append(numpy_helper.from_array(rewritten, name))
        node.input[1] = name
        yield f"{node.name or node.output[0]!r} target {target.tolist()} -> {rewritten.tolist()}"


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value) if value is not None else None
    return None


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors; another tensor that already holds a new name is renamed out of the way."""
    taken = tensor_names(graph)
    parked = {old: unique_name(f"{new}_adopting", taken) for old, new in mapping.items()}
    _replace(graph, parked)
    for new in mapping.values():
        if new in taken:
            _replace(graph, {new: unique_name(new, taken)})
    _replace(graph, {parked[old]: new for old, new in mapping.items()})


def _replace(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = mapping.get(name, name)
        for sub in subgraphs(node):
            _replace(sub, mapping)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = mapping.get(value.name, value.name)


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name ``graph`` uses, its subgraphs' included (to pick a new one)."""
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        names.update(node.input, node.output)
        for sub in subgraphs(node):
            names |= tensor_names(sub)
    return names


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (then added)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs in ``node``'s attributes (an If's branches, a Loop's body)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs
