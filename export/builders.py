"""The sources of a model: torchvision's ResNets, the CIFAR ResNets, a user's factory, timm
models (``timm/<name>``, :mod:`export.timm_source`) and Hub folders (:mod:`export.hub`).

Each builder returns a :class:`Source`: the model (eval mode; a Hub folder's weights
already in, a checkpoint's not yet) and what the source itself knows about labels and
preprocessing. Flags and training checkpoints override those defaults later, in
:mod:`export.api`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from export import cifar_resnet
from export.errors import ExportError
from export.labels import CIFAR10_CLASSES, imagenet_classes
from service.metadata import CropRounding

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of the CIFAR-10 training set; this project's training checkpoints
# carry their own (computed on the 45k training split), which take precedence.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

Kind = Literal["torchvision", "cifar", "custom", "timm", "transformers"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]


@dataclass(frozen=True)
class Defaults:
    """Labels and preprocessing a source implies, before flags or checkpoints override them."""

    labels: tuple[str, ...] | None
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bilinear"
    weights: str | None = None
    """The weights loaded by the source (no checkpoint): torchvision weights name, timm
    pretrained tag, or a Hub folder's weights file name."""
    crop_pct: float | None = None
    """crop / resize as the source computes it (timm, transformers): a new --input-size
    gets ``floor(size / crop_pct)``, as the source's own transform would."""
    crop_rounding: CropRounding = "half_even"
    """How the source's center crop rounds an odd margin: torchvision's half to even, or
    transformers' floor."""
    unsupported: str | None = None
    """Why the source's own eval transform cannot be stated in the card (a squashing
    resize, a non-square input); the export then needs --input-size and --resize."""


IMAGENET_DEFAULTS = Defaults(
    labels=None, resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
)
CIFAR_DEFAULTS = Defaults(
    labels=CIFAR10_CLASSES, resize=32, crop=32, mean=CIFAR10_MEAN, std=CIFAR10_STD
)


@dataclass(frozen=True)
class Source:
    """A freshly built model (eval mode) and the defaults its source implies."""

    model: nn.Module
    kind: Kind
    arch: str
    defaults: Defaults
    library: str | None = None
    """The library and its version, e.g. 'timm 1.0.31' (None for torchvision and ours)."""
    config_sha256: str | None = None
    """A Hub folder's config.json hash."""
    weights_sha256: str | None = None
    """A Hub folder's weights file hash."""


def kind_of(arch: str) -> Kind | Literal["folder"]:
    """Which source ``arch`` names; a directory is a Hub folder (:mod:`export.hub`)."""
    if arch in TORCHVISION_ARCHS:
        return "torchvision"
    if cifar_resnet.is_cifar_arch(arch):
        return "cifar"
    if Path(arch).is_dir():
        return "folder"
    if arch.startswith("timm/"):
        return "timm"
    if ":" in arch:
        return "custom"
    raise ExportError(
        f"unknown architecture {arch!r}: expected one of {', '.join(TORCHVISION_ARCHS)}, "
        f"a CIFAR ResNet ({', '.join(cifar_resnet.CIFAR_ARCHS)}), timm/<model name>, "
        "a Hub folder, or a user factory as package.module:function"
    )


def build(
    arch: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    code_path: Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    config_sha256: str | None = None,
) -> Source:
    """Build ``arch``; ``weights`` is a torchvision weights name, a timm pretrained tag, or
    None for random weights. ``state`` is the checkpoint about to be loaded, if any: a timm
    head is sized to fit it, and a Hub folder refuses it (the folder has its weights) unless
    the checkpoint was fine-tuned from that folder: ``config_sha256``, its config's hash,
    then asks for the folder's architecture with a ``num_classes`` head and no weights."""
    kind = kind_of(arch)
    if weights is not None and kind not in ("torchvision", "timm"):
        raise ExportError(
            f"--weights {weights} applies to torchvision and timm architectures only; "
            + (
                f"{arch} is a Hub folder with its own weights"
                if kind == "folder"
                else f"give {arch} its weights with --checkpoint"
            )
        )
    if kind == "folder":
        from export import hub

        if config_sha256 is not None:
            return hub.build_fine_tuned(
                Path(arch), num_classes=num_classes, config_sha256=config_sha256
            )
        if state is not None:
            raise ExportError(f"{arch} is a Hub folder with its own weights: drop --checkpoint")
        return hub.build(Path(arch))
    if kind == "timm":
        from export import timm_source

        name = arch.removeprefix("timm/")
        return timm_source.build(name, weights=weights, num_classes=num_classes, state=state)
    if kind == "torchvision":
        return _torchvision(arch, weights=weights, num_classes=num_classes)
    if kind == "cifar":
        model = cifar_resnet.build(arch, num_classes=num_classes or len(CIFAR10_CLASSES))
        return Source(model.eval(), "cifar", arch, CIFAR_DEFAULTS)
    return _custom(arch, num_classes=num_classes, code_path=code_path)


def torchvision_defaults(arch: str, weights: str | None) -> Defaults:
    """What torchvision's weights say about labels and preprocessing; no download needed.

    ``weights=None`` (random weights) gets ImageNet's usual 256/224 and its class names.
    """
    if weights is None:
        return replace(IMAGENET_DEFAULTS, labels=imagenet_classes())
    chosen = resolve_weights(arch, weights)
    transforms = chosen.transforms()
    return Defaults(
        labels=tuple(chosen.meta["categories"]),
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=triple(transforms.mean),
        std=triple(transforms.std),
        interpolation=transforms.interpolation.value,
        weights=chosen.name,
    )


def resolve_weights(arch: str, weights: str) -> WeightsEnum:
    """``IMAGENET1K_V2``, ``DEFAULT`` or ``ResNet50_Weights.IMAGENET1K_V2`` -> the enum member."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    name = weights.rpartition(".")[2].upper()
    try:
        return enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ExportError(f"{arch} has no weights {weights!r}; known: {names}, none") from None


def _torchvision(arch: str, *, weights: str | None, num_classes: int | None) -> Source:
    from torchvision.models import get_model_builder

    defaults = torchvision_defaults(arch, weights)
    if weights is None:
        model = get_model_builder(arch)(weights=None, num_classes=num_classes or 1000)
        if num_classes not in (None, 1000):
            defaults = replace(defaults, labels=None)
        return Source(model.eval(), "torchvision", arch, defaults)
    chosen = resolve_weights(arch, weights)
    if num_classes not in (None, len(chosen.meta["categories"])):
        raise ExportError(f"--weights {chosen.name} has 1000 classes, not {num_classes}")
    log.info("fetching torchvision weights %s.%s (cached under $TORCH_HOME)", arch, chosen.name)
    try:
        model = get_model_builder(arch)(weights=chosen)
    except (urllib.error.URLError, OSError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ExportError(
            f"cannot download {arch} weights {chosen.name} from {chosen.url} ({reason}); "
            "this machine looks offline: download the file elsewhere and pass it with "
            "--checkpoint, or use --weights none"
        ) from exc
    return Source(model.eval(), "torchvision", arch, defaults)


def _custom(arch: str, *, num_classes: int | None, code_path: Path | None) -> Source:
    factory = load_factory(arch, code_path=code_path)
    kwargs: dict[str, Any] = {}
    if num_classes is not None and "num_classes" in _parameters(factory):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ExportError(f"{arch}({_show(kwargs)}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExportError(f"{arch}() returned a {type(model).__name__}, not a torch.nn.Module")
    return Source(model.eval(), "custom", arch, IMAGENET_DEFAULTS)


def load_factory(spec: str, *, code_path: Path | None = None) -> Callable[..., Any]:
    """Import ``package.module:function`` from ``code_path`` (if given) or the current directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExportError(f"{spec!r}: a user model is named package.module:function")
    roots = [str(code_path.resolve())] if code_path is not None else []
    roots.append(str(Path.cwd()))
    for root in reversed(roots):
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"{code_path} or the current directory" if code_path else "the current directory"
        raise ExportError(
            f"cannot import {module_name!r} from {where} ({exc}); "
            "pass the directory that holds the package with --code-path"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExportError(f"{module_name} has no callable {attr!r}")
    return factory


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def triple(values: Any) -> tuple[float, float, float]:
    """Three floats, e.g. a per-channel mean."""
    a, b, c = (float(x) for x in values)
    return (a, b, c)
