"""transformers ResNets: a folder as ``ResNetForImageClassification.save_pretrained`` and an
image processor's ``save_pretrained`` leave it (the layout of microsoft/resnet-*).

The preprocessing is ``ConvNextImageProcessor``'s (what microsoft/resnet-* use), read from
``preprocessor_config.json``: below a shortest edge of 384 it resizes the shorter side to
``int(shortest_edge / crop_pct)`` and center-crops ``shortest_edge`` starting at
``(side - crop) // 2`` (the card's ``crop_rounding`` 'floor'; torchvision rounds half to
even), which the card states exactly; from 384 up it squashes the image to a square, which
the card cannot state.
The embedding is the pooled features that feed the classifier (``pooler_output``, flattened),
the input of the classifier's ``nn.Linear``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from export import builders, hub
from export.errors import ExportError

log = logging.getLogger(__name__)

PROCESSOR = "preprocessor_config.json"
CLASSIFIER = "ResNetForImageClassification"
PROCESSOR_TYPES = ("ConvNextImageProcessor", "ConvNextFeatureExtractor")
"""With or without the Fast / Pil suffix; the feature extractor is the older name."""
RESAMPLE: dict[int, builders.Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic"}
"""PIL's resampling codes, as preprocessor_config.json stores them."""
SQUASH_FROM = 384
"""ConvNextImageProcessor squashes instead of cropping from this shortest edge up."""
# ConvNextImageProcessor's class defaults, for keys the file leaves out.
DEFAULT_SIZE = 384
DEFAULT_CROP_PCT = 224 / 256
DEFAULT_RESAMPLE = 3
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)


class LogitsOf(nn.Module):
    """A transformers classifier as ``forward(pixels) -> logits``, for :class:`WithEmbedding`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=x).logits
        return logits


def library() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def from_folder(
    folder: Path,
    config: dict[str, Any],
    *,
    config_sha256: str,
    weights: Path | None,
    num_classes: int | None = None,
) -> builders.Source:
    """``ResNetForImageClassification`` from ``config.json``, the weights file loaded.

    ``weights=None`` builds the architecture alone, with a ``num_classes``-way head when
    given (a fine-tuned checkpoint's weights go in later; the folder's labels do not apply).
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    archs = config.get("architectures") or [CLASSIFIER]
    if CLASSIFIER not in archs:
        raise ExportError(
            f"{folder}/config.json names {', '.join(map(str, archs))}: a ResNet without its "
            f"classification head; the export needs a {CLASSIFIER} folder"
        )
    defaults = processor_defaults(folder)  # before the model: a bad file fails fast
    if num_classes is not None:  # transformers sizes the classifier by len(id2label)
        config = {**config, "id2label": {i: f"LABEL_{i}" for i in range(num_classes)}}
        config.pop("label2id", None)
    try:
        resnet_config = ResNetConfig.from_dict(config)
        model = ResNetForImageClassification(resnet_config)
    except Exception as exc:  # transformers validates configs with several error types
        raise hub.cannot_build(library(), f"a {CLASSIFIER}", folder, exc) from exc
    source = builders.Source(
        LogitsOf(model).eval(),
        "transformers",
        f"{CLASSIFIER} ({hub.repo_name(folder)})",
        defaults,
        library=library(),
        config_sha256=config_sha256,
    )
    if weights is None:
        return source
    ckpt = hub.load_weights(model, weights, what=f"{CLASSIFIER} ({folder}/config.json)")
    labels = id2label(dict(resnet_config.id2label or {}), folder)
    return replace(
        source,
        defaults=replace(defaults, labels=labels, weights=weights.name),
        weights_sha256=ckpt.sha256,
    )


def id2label(mapping: dict[Any, Any], folder: Path) -> tuple[str, ...]:
    """The class names in index order; transformers' placeholders (LABEL_0..) are kept.

    transformers sizes the classifier by ``len(id2label)``, so the count always fits.
    """
    by_index = {int(k): str(v) for k, v in mapping.items()}
    num_labels = len(by_index)
    if sorted(by_index) != list(range(num_labels)):
        raise ExportError(
            f"{folder}/config.json: id2label's indices are not 0..{num_labels - 1}; "
            "give the names with --labels"
        )
    names = tuple(by_index[i] for i in range(num_labels))
    if names == tuple(f"LABEL_{i}" for i in range(num_labels)):
        log.warning("%s/config.json names its classes LABEL_0.. only (use --labels)", folder)
    return names


def processor_defaults(folder: Path) -> builders.Defaults:
    """The card's preprocessing from ``preprocessor_config.json`` (no labels yet).

    What the card cannot state becomes ``unsupported`` (the export then needs --input-size
    and --resize) rather than a silently different transform.
    """
    path = folder / PROCESSOR
    if not path.is_file():
        raise ExportError(
            f"{folder} has no {PROCESSOR} (what the image processor's save_pretrained writes "
            f"beside config.json): it says how images are resized and normalized"
        )
    p = hub.read_json(path)
    problems: list[str] = []
    kind = str(p.get("image_processor_type") or p.get("feature_extractor_type") or "unnamed")
    if kind.removesuffix("Fast").removesuffix("Pil") not in PROCESSOR_TYPES:
        problems.append(f"its image processor is {kind}, not ConvNextImageProcessor")
    size = p.get("size", DEFAULT_SIZE)
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    if not isinstance(shortest, int) or shortest <= 0:
        problems.append(f"its size is {size}, not a shortest_edge")
        shortest = 224
    elif shortest >= SQUASH_FROM:
        problems.append(
            f"its shortest_edge is {shortest}: from {SQUASH_FROM} up ConvNextImageProcessor "
            f"squashes images to {shortest}x{shortest} without keeping their aspect ratio"
        )
    crop_pct = float(p.get("crop_pct") or DEFAULT_CROP_PCT)
    resample = p.get("resample", DEFAULT_RESAMPLE)
    if resample not in RESAMPLE:
        problems.append(f"its resample is {resample} (served: 0 nearest, 2 bilinear, 3 bicubic)")
    if p.get("do_resize", True) is False:
        problems.append("do_resize is false")
    if p.get("do_center_crop"):
        problems.append("do_center_crop adds a second crop")
    rescale = p.get("rescale_factor", 1 / 255) if p.get("do_rescale", True) else 1.0
    if abs(float(rescale) - 1 / 255) > 1e-9:
        problems.append(f"its rescale factor is {rescale}, not 1/255")
    normalize = p.get("do_normalize", True)
    return builders.Defaults(
        labels=None,
        resize=int(shortest / crop_pct),  # ConvNextImageProcessor.resize, to the pixel
        crop=shortest,
        mean=_channels(p.get("image_mean", STANDARD_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=_channels(p.get("image_std", STANDARD_STD)) if normalize else (1.0, 1.0, 1.0),
        interpolation=RESAMPLE.get(resample, "bicubic"),
        crop_pct=crop_pct,
        # Both backends (PIL and the default torchvision one) crop at (side - crop) // 2.
        crop_rounding="floor",
        unsupported=f"{PROCESSOR} cannot be served as is: " + "; ".join(problems)
        if problems
        else None,
    )


def _channels(value: Any) -> tuple[float, float, float]:
    """A per-channel value; a single number applies to all three channels."""
    if isinstance(value, (int, float)):
        return (float(value), float(value), float(value))
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ExportError(f"{PROCESSOR}: expected 3 per-channel values, got {value!r}")
    return builders.triple(value)
