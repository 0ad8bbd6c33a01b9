"""The export pipeline as one function: build, load weights, export, verify, describe, write.

:func:`export_model` is what ``python -m export`` runs, and what tests call directly.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from export import agreement, builders, checkpoint, onnx_export, verify
from export.errors import ExportError
from export.features import FlipAverage, TimmOutputs, WithEmbedding
from export.labels import read_labels
from export.repository import ExportResult, target
from service.metadata import ModelCard, Preprocessing, Provenance, TestTimeAugmentation

log = logging.getLogger(__name__)

Interpolation = builders.Interpolation


def export_model(
    arch: str,
    *,
    out: Path | str,
    name: str,
    version: int | None = None,
    weights: str | None = None,
    checkpoint_path: Path | str | None = None,
    code_path: Path | str | None = None,
    labels: Path | str | Sequence[str] | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: Interpolation | None = None,
    channel_order: Literal["RGB", "BGR"] = "RGB",
    embedding_layer: str | None = None,
    tta: TestTimeAugmentation = "none",
    verify_images: Path | str | None = None,
    batch_sizes: tuple[int, ...] = agreement.BATCH_SIZES,
    tolerance: float = agreement.TOLERANCE,
    opset: int = onnx_export.DEFAULT_OPSET,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``arch`` to ``out/name/version/model.onnx``, verified and self-describing.

    ``arch`` is a torchvision ResNet (``resnet50``), a CIFAR ResNet (``cifar-resnet20``),
    a timm model (``timm/resnet50d``), a Hub folder (timm or transformers, with its
    weights) or a user factory (``package.module:function``). ``weights`` is a torchvision
    weights name (``IMAGENET1K_V2``, ``DEFAULT``), a timm pretrained tag (``a1_in1k``) or
    None/``"none"`` for random weights. Preprocessing and labels come from the weights,
    the checkpoint or the source's defaults, and any argument given here overrides them.
    ``tta="flip"`` puts test-time augmentation into the graph (see :class:`FlipAverage`).
    Raises :class:`ExportError`.
    """
    started = time.perf_counter()
    out = Path(out)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    code_path = Path(code_path) if code_path is not None else None
    verify_images = Path(verify_images) if verify_images is not None else None
    if weights is not None and weights.lower() == "none":
        weights = None
    if weights is not None and checkpoint_path is not None:
        raise ExportError("give either --weights or --checkpoint, not both")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ExportError(f"verification batch sizes must be >= 1, got {batch_sizes}")
    target_dir, version = target(out, name, version, overwrite=overwrite)

    ckpt = checkpoint.load(checkpoint_path) if checkpoint_path is not None else None
    # A model fine-tuned from a Hub folder is exported with that folder, wherever it now is:
    # the folder's config hash, not its path, says whether it is the same one.
    if (
        ckpt is not None
        and ckpt.arch not in (None, arch)
        and not (ckpt.config_sha256 is not None and builders.kind_of(arch) == "folder")
    ):
        raise ExportError(f"checkpoint {ckpt.path} was trained as {ckpt.arch}, not {arch}")
    names = _labels(labels) or (ckpt.classes if ckpt else None)

    log.info("building %s (%s)", arch, _weights_text(arch, weights, checkpoint_path))
    source = builders.build(
        arch,
        weights=weights,
        num_classes=len(names) if names else None,
        code_path=code_path,
        state=ckpt.state_dict if ckpt else None,
        config_sha256=ckpt.config_sha256 if ckpt else None,
    )
    if ckpt is not None:
        checkpoint.apply(source.model, ckpt.state_dict, what=arch)
        log.info("loaded %d tensors from %s", len(ckpt.state_dict), ckpt.path)
    model: nn.Module
    if source.kind == "timm" and embedding_layer is None:
        model = TimmOutputs(source.model)
    else:
        model = WithEmbedding(source.model, layer=embedding_layer)
    if tta == "flip":
        model = FlipAverage(model)
    elif tta not in get_args(TestTimeAugmentation):
        choices = ", ".join(map(repr, get_args(TestTimeAugmentation)))
        raise ExportError(f"test-time augmentation must be one of {choices}, got {tta!r}")
    model.eval()

    pre = preprocessing(
        source, ckpt, input_size=input_size, resize=resize, mean=mean, std=std,
        interpolation=interpolation, channel_order=channel_order,
    )  # fmt: skip
    num_classes, dim = _probe(model, pre.crop)
    if names is None:
        names = source.defaults.labels
    if names is None and source.kind in ("timm", "transformers"):
        raise ExportError(
            f"{arch} has {num_classes} classes and no names for them (only ImageNet-1k's 1000 "
            "are known): give their names with --labels FILE, one per line"
        )
    if names is None:
        log.warning("no labels given: naming the %d classes class_0.. (use --labels)", num_classes)
        names = tuple(f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        given = f"{labels} holds {len(names)} labels"
        if not isinstance(labels, (str, Path)):
            given = f"{len(names)} labels were given"
        raise ExportError(f"the model has {num_classes} outputs but {given}")
    log.info("%s: %d classes, embedding width %d, input %dx%d", arch, num_classes, dim, pre.crop,
             pre.crop)  # fmt: skip

    log.info("exporting to ONNX (opset %d) ...", opset)
    proto = onnx_export.to_onnx(model, input_size=pre.crop, opset=opset)
    card = ModelCard(
        labels=names,
        preprocessing=pre,
        provenance=Provenance(
            arch=source.arch,
            source=source.kind,
            weights=source.defaults.weights or (ckpt.path.name if ckpt else None),
            checkpoint_sha256=ckpt.sha256 if ckpt else source.weights_sha256,
            library=source.library,
            config_sha256=source.config_sha256,
            trained=weights is not None or ckpt is not None or source.weights_sha256 is not None,
            opset=onnx_export.graph_opset(proto),
            exporter_version=onnx_export.exporter_name(),
            torch_version=torch.__version__,
            exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            test_time_augmentation=tta,
        ),
    )

    n = max(batch_sizes)
    if verify_images is not None:
        images, inputs = verify.folder_images(verify_images, n, pre), str(verify_images)
    else:
        images, inputs = verify.random_images(n, pre), "random"
    onnx_export.set_metadata(proto, card.to_metadata_props())
    results = verify.compare(model, proto.SerializeToString(), images, batch_sizes=batch_sizes)
    figures = agreement.summarize(results, inputs=inputs, tolerance=tolerance)
    text = agreement.report(results, figures)
    log.info("%s", text)
    agreement.check(figures)

    card = card.model_copy(update={"verification": figures})
    onnx_export.set_metadata(proto, card.to_metadata_props())
    path = target_dir / "model.onnx"
    onnx_export.save(proto, path)
    seconds = time.perf_counter() - started
    log.info("wrote %s (%.1f MB) in %.1fs", path, path.stat().st_size / 1e6, seconds)
    return ExportResult(path=path, version=version, card=card, report=text)


def _labels(labels: Path | str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A labels file (path) or the class names themselves."""
    if labels is None:
        return None
    if isinstance(labels, (Path, str)):
        return read_labels(Path(labels))
    if not labels:
        raise ExportError("labels must not be empty")
    return tuple(labels)


def _weights_text(arch: str, weights: str | None, ckpt: Path | None) -> str:
    if ckpt is not None:
        return f"checkpoint {ckpt}"
    if weights is not None:
        return f"weights {weights}"
    return "the folder's weights" if Path(arch).is_dir() else "random weights, untrained"


def preprocessing(
    source: builders.Source,
    ckpt: checkpoint.Checkpoint | None,
    *,
    input_size: int | None,
    resize: int | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: Interpolation | None = None,
    channel_order: Literal["RGB", "BGR"] = "RGB",
) -> Preprocessing:
    """The card's preprocessing: flags first, then the checkpoint, then the source's defaults.

    A new crop size without a resize keeps the source's resize/crop ratio (256/224 for
    ImageNet models, 1 for CIFAR ones; ``floor(crop / crop_pct)`` for timm and
    transformers, as their transforms compute it). A source whose own transform the card
    cannot state needs both sizes given. Fine-tuning computes its eval transform here too,
    so that it validates on what the export will serve.
    """
    d = source.defaults
    # A fine-tuned checkpoint states the sizes it was validated at, which the card takes.
    sized = ckpt is not None and bool(ckpt.resize) and input_size in (None, ckpt.input_size)
    if d.unsupported is not None and not sized:
        if input_size is None or resize is None:
            raise ExportError(
                f"{d.unsupported}: give --input-size and --resize to serve it with a "
                "shorter-side resize and a square center crop instead"
            )
        log.warning("%s: serving it with --resize %d --input-size %d", d.unsupported, resize,
                    input_size)  # fmt: skip
    crop = input_size or (ckpt.input_size if ckpt else None) or d.crop
    if resize is None and ckpt is not None and ckpt.resize and crop == ckpt.input_size:
        resize = ckpt.resize
    elif resize is None and crop == d.crop:
        resize = d.resize
    elif resize is None:
        resize = math.floor(crop / d.crop_pct) if d.crop_pct else round(crop * d.resize / d.crop)
    if resize < crop:
        raise ExportError(f"--resize {resize} is smaller than the input size {crop}")
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != 3:
            raise ExportError(f"{flag} takes 3 values (one per channel), got {len(values)}")
    if std is not None and min(std) <= 0:
        raise ExportError(f"--std values must be > 0, got {list(std)}")
    return Preprocessing(
        resize=resize,
        crop=crop,
        mean=_triple(mean) or (ckpt.mean if ckpt else None) or d.mean,
        std=_triple(std) or (ckpt.std if ckpt else None) or d.std,
        interpolation=interpolation or _filter(ckpt) or d.interpolation,
        channel_order=channel_order,
        crop_rounding=d.crop_rounding,
    )


def _filter(ckpt: checkpoint.Checkpoint | None) -> Interpolation | None:
    """The checkpoint's resize filter, if it names one the card can state."""
    if ckpt is None or ckpt.interpolation is None:
        return None
    for name in get_args(Interpolation):
        if ckpt.interpolation == name:
            return name
    raise ExportError(
        f"checkpoint {ckpt.path} names the resize filter {ckpt.interpolation!r}; the card"
        f" states {', '.join(get_args(Interpolation))}"
    )


def _triple(values: Sequence[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    a, b, c = (float(x) for x in values)
    return (a, b, c)


def _probe(model: nn.Module, size: int) -> tuple[int, int]:
    """(classes, embedding width), from one forward pass in PyTorch."""
    try:
        with torch.no_grad():
            logits, embedding = model(torch.randn(2, 3, size, size))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"forward pass on [2, 3, {size}, {size}] failed: {type(exc).__name__}: {exc}"
        ) from exc
    return int(logits.shape[1]), int(embedding.shape[1])
