"""Adopting an ONNX classifier another tool wrote (Model Zoo, timm, optimum, torch.onnx).

``python -m export FILE.onnx --labels ... --mean ... --std ...`` runs :func:`adopt_onnx`: the
graph is rewritten to the service's contract (:mod:`export.onnx_graph`), given the model
card the flags describe, and checked against the original file with ONNX Runtime on the
same inputs at several batch sizes. A graph that cannot run at other batch sizes than one
is served one image at a time (``max_batch_size`` 1 in the model's ``config.json``).
Torch-free: onnx, onnxruntime, numpy and Pillow only, so it runs where PyTorch is absent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from export import agreement, onnx_graph, onnx_verify
from export.errors import ExportError
from export.labels import read_labels
from export.onnx_verify import first_line
from export.repository import ExportResult, target, write_checked
from service.metadata import ModelCard, Preprocessing, Provenance
from service.repository import CONFIG_FILE, read_overrides

log = logging.getLogger(__name__)

Interpolation = Literal["bilinear", "bicubic", "nearest"]
IMAGENET_RATIO = 256 / 224
"""Resize/crop of ImageNet's eval transform: the default --resize for an adopted file."""
_GENERIC_NAMES = frozenset({"", "model", "main_graph", "torch_jit", "torch-jit-export", "graph"})


def adopt_onnx(
    path: Path | str,
    *,
    out: Path | str,
    name: str,
    version: int | None = None,
    labels: Path | str | None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: Interpolation | None = None,
    channel_order: Literal["RGB", "BGR"] = "RGB",
    verify_images: Path | str | None = None,
    batch_sizes: tuple[int, ...] = agreement.BATCH_SIZES,
    tolerance: float = agreement.TOLERANCE,
    overwrite: bool = False,
) -> ExportResult:
    """Adopt the classifier in ``path`` as ``out/name/version/model.onnx``, verified.

    ``labels`` (a file), ``mean`` and ``std`` are required: a plain ONNX file records none
    of them, and a guessed normalization would serve wrong answers without any error.
    ``input_size`` is required only when the graph's input size is not static. Raises
    :class:`ExportError` for anything the user can fix.
    """
    started = time.perf_counter()
    path, out = Path(path), Path(out)
    data, original = _load(path)
    _refuse_carded(original, path, out, name)
    missing = [f for f, v in (("--labels", labels), ("--mean", mean), ("--std", std)) if v is None]
    if missing or labels is None or mean is None or std is None:
        raise ExportError(
            f"{' and '.join(missing)} required to adopt an ONNX file: it records no labels "
            "or normalization (ImageNet models: --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225)"
        )
    names = read_labels(Path(labels))
    if not batch_sizes or min(batch_sizes) < 1:
        raise ExportError(f"verification batch sizes must be >= 1, got {batch_sizes}")
    target_dir, version = target(out, name, version, overwrite=overwrite)

    head = onnx_graph.find_head(original, num_labels=len(names))
    pre = _preprocessing(head, input_size, resize, mean, std, interpolation, channel_order)
    sizes = batch_sizes if max(batch_sizes) > 1 else (*batch_sizes, 2)
    images, inputs = onnx_verify.inputs(verify_images, max(sizes), pre)
    reference = onnx_verify.Original(original, head)
    logits, embedding = reference.run(images[:1])
    if logits.ndim != 2 or embedding.ndim != 2:
        raise ExportError(
            f"the original file gives logits {list(logits.shape)} and an embedding "
            f"{list(embedding.shape)} for one image; expected [1, classes] and [1, D]"
        )
    if logits.shape[1] != len(names):
        raise ExportError(
            f"the logits have {logits.shape[1]} columns but {labels} has {len(names)} labels"
        )
    shape = {"crop": pre.crop, "num_classes": len(names), "dim": embedding.shape[1]}

    def verify(graph: onnx.ModelProto, at: tuple[int, ...]) -> onnx_verify.Figures:
        return onnx_verify.compare(graph, reference, images, at, inputs=inputs, tolerance=tolerance)

    adopted = onnx_graph.contract_graph(original, head, dynamic=True, **shape)
    try:
        results, figures = verify(adopted, sizes)
        batched = True
    except ExportError as exc:
        if head.batch not in (None, 1):
            raise ExportError(
                f"the graph is fixed at batch {head.batch} and cannot be made to run at other "
                f"batch sizes ({exc}); the service needs one that runs at batch 1"
            ) from exc
        adopted = onnx_graph.contract_graph(original, head, dynamic=False, **shape)
        results, figures = verify(adopted, (1,))
        log.warning("the graph runs only at batch 1 (%s): serving it with max_batch_size 1", exc)
        batched = False
    text = agreement.report(results, figures, reference=onnx_verify.REFERENCE)
    log.info("%s", text)

    card = ModelCard(
        labels=names,
        preprocessing=pre,
        provenance=_provenance(original, path, data, head),
        verification=figures,
    )
    del adopted.metadata_props[:]
    for key, value in card.to_metadata_props().items():
        adopted.metadata_props.add(key=key, value=value)
    model_path = target_dir / "model.onnx"
    written = write_checked(adopted, model_path, what="adopted")
    if not batched:
        _limit_batch(target_dir.parent, name)  # before the model appears: never served unlimited
    os.replace(written, model_path)
    log.info("wrote %s in %.1fs", model_path, time.perf_counter() - started)
    return ExportResult(path=model_path, version=version, card=card, report=text)


def _load(path: Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes (for its hash) and its graph, with any external weights loaded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        proto = onnx.load_model_from_string(data)
        load_external_data_for_model(proto, str(path.parent))
    except OSError as exc:
        raise ExportError(f"{path}: cannot read its external weights: {exc}") from exc
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model: {first_line(exc)}") from exc
    if not proto.graph.node or not proto.opset_import:
        raise ExportError(f"{path} is not an ONNX model (it holds no graph)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
    return data, proto


def _refuse_carded(proto: onnx.ModelProto, path: Path, out: Path, name: str) -> None:
    found = next((p.value for p in proto.metadata_props if p.key == "format"), "")
    if found.startswith("resnet-serve/"):
        raise ExportError(
            f"{path} already carries a model card ({found}): it is already a resnet-serve "
            f"model; copy it to {out / name}/<version>/model.onnx instead of adopting it"
        )


def _preprocessing(
    head: onnx_graph.Head,
    input_size: int | None,
    resize: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: Interpolation | None,
    channel_order: Literal["RGB", "BGR"],
) -> Preprocessing:
    """The card's preprocessing from the flags, checked against the graph's input size."""
    if head.size is not None and input_size not in (None, head.size):
        raise ExportError(
            f"--input-size {input_size} differs from the graph's input size {head.size} "
            f"({head.input!r} is [N, 3, {head.size}, {head.size}])"
        )
    crop = input_size or head.size
    if crop is None:
        raise ExportError(f"the graph's input {head.input!r} has no fixed size: give --input-size")
    if resize is None:
        resize = round(crop * IMAGENET_RATIO)
        log.info("--resize not given: %d, ImageNet's 256/224 of the %d-pixel crop", resize, crop)
    if resize < crop:
        raise ExportError(f"--resize {resize} is smaller than the input size {crop}")
    if min(std) <= 0:
        raise ExportError(f"--std values must be > 0, got {list(std)}")
    return Preprocessing(
        resize=resize,
        crop=crop,
        mean=_triple("--mean", mean),
        std=_triple("--std", std),
        interpolation=interpolation or "bilinear",
        channel_order=channel_order,
    )


def _triple(flag: str, values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ExportError(f"{flag} takes 3 values (one per channel), got {len(values)}")
    a, b, c = (float(v) for v in values)
    return a, b, c


def _provenance(
    proto: onnx.ModelProto, path: Path, data: bytes, head: onnx_graph.Head
) -> Provenance:
    stem, graph = path.stem, proto.graph.name
    arch = graph if stem.lower() in _GENERIC_NAMES and graph not in _GENERIC_NAMES else stem
    library = f"{proto.producer_name} {proto.producer_version}".strip()
    change = f", {head.softmax} dropped" if head.softmax else ""
    return Provenance(
        arch=arch,
        source="onnx",
        weights=path.name,
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        library=library or None,
        trained=True,  # the weights are the file's own; adoption never initializes any
        opset=onnx_graph.opset(proto),
        exporter_version=(
            f"export.adopt{change} (onnx {onnx.__version__}, onnxruntime {ort.__version__})"
        ),
        torch_version=None,
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _limit_batch(model_dir: Path, name: str) -> None:
    """Set ``max_batch_size`` 1 in the model's config.json, keeping its other settings."""
    path = model_dir / CONFIG_FILE
    _, error = read_overrides(path)
    if error is not None:
        raise ExportError(f"{error}; fix or remove it (this model needs max_batch_size 1)")
    settings = json.loads(path.read_text()) if path.exists() else {}  # valid, as just read
    settings["max_batch_size"] = 1
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)
    log.warning("wrote %s: every version of %s is served one image at a time", path, name)
