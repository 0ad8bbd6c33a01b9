"""The network to fine-tune: a source the export reads, its starting weights, and a new
classifier for the user's classes.

Sources are the exporter's (:func:`export.builders.build`): a torchvision ResNet (random,
or ``--weights`` online), a CIFAR ResNet, ``timm/<name>`` (random, or a pretrained tag
online) and Hub folders (timm or transformers, with their weights, offline). ``--init``
then loads any checkpoint the export reads (:func:`export.checkpoint.load`). The classifier
is replaced for the data's classes, unless the starting checkpoint already classifies
exactly them (a fine-tune fine-tuned further).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from export import builders, checkpoint
from export.errors import ExportError

log = logging.getLogger("export.finetune")


@dataclass(frozen=True)
class Network:
    """A model ready to fine-tune and the parts the recipe treats apart."""

    source: builders.Source
    """What the export knows of it: kind, defaults (preprocessing), folder hashes."""
    model: nn.Module
    """``forward(pixels) -> logits``."""
    module: nn.Module
    """The library's own module, whose state_dict the checkpoint keeps (the same as
    ``model`` except for transformers, whose model returns an output object)."""
    head: nn.Module
    """The classifier, which trains at the full learning rate."""


def build(
    name: str,
    *,
    weights: str | None,
    init: Path | None,
    classes: tuple[str, ...],
    new_head: bool,
) -> Network:
    """``name`` (the exporter's SOURCE) with its starting weights and a head for ``classes``.

    An ``init`` checkpoint that names its classes must name these, in this order, unless
    ``new_head`` (its head is then replaced like any other). Raises :class:`ExportError`.
    """
    if builders.kind_of(name) == "custom":
        raise ExportError(
            f"{name}: fine-tuning takes torchvision and CIFAR ResNets, timm/<name> and Hub"
            " folders; a user's factory has no classifier it knows how to replace"
        )
    source = builders.build(name, weights=weights)
    module = source.model.get_submodule("model" if source.kind == "transformers" else "")
    keep = False
    if init is not None:
        keep = _load_init(source, module, name, init, classes=classes, new_head=new_head)
    if not keep:
        replace_head(source.kind, module, len(classes))
    if source.kind == "transformers":  # its config names the classes, as the Hub's do
        hf: Any = module
        hf.config.id2label = dict(enumerate(classes))
        hf.config.label2id = {c: i for i, c in enumerate(classes)}
    head = module.get_submodule(head_name(source.kind, module))
    how = "kept from --init" if keep else "new"
    log.info("%s: %s classifier for %d classes (%s)", name, how, len(classes), head)
    return Network(source, source.model.train(), module, head)


def head_name(kind: str, module: nn.Module) -> str:
    """The classifier's qualified name in ``module``."""
    if kind == "timm":
        classifier = module.get_classifier()  # type: ignore[operator]
        return next(n for n, m in module.named_modules() if m is classifier)
    if kind == "transformers":
        return "classifier.1"
    return "fc"


def replace_head(kind: str, module: nn.Module, num_classes: int) -> None:
    """A freshly initialized ``num_classes``-way classifier in place of ``module``'s."""
    if kind == "timm":
        module.reset_classifier(num_classes)  # type: ignore[operator]
        return
    name = head_name(kind, module)
    old = module.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ExportError(f"the classifier {name} is a {type(old).__name__}, not nn.Linear")
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent), attr, nn.Linear(old.in_features, num_classes))
    if kind == "transformers":
        hf: Any = module  # a ResNetForImageClassification
        hf.num_labels = hf.config.num_labels = num_classes


def _load_init(
    source: builders.Source,
    module: nn.Module,
    name: str,
    path: Path,
    *,
    classes: tuple[str, ...],
    new_head: bool,
) -> bool:
    """Load ``--init`` into ``module``; whether its head is kept (it classifies ``classes``)."""
    ckpt = checkpoint.load(path)
    if ckpt.config_sha256 is not None and ckpt.config_sha256 != source.config_sha256:
        raise ExportError(
            f"--init: {path} was fine-tuned from the Hub folder {ckpt.arch}, whose config"
            f" differs from {name}'s"
        )
    if ckpt.config_sha256 is None and ckpt.arch is not None and ckpt.arch != name:
        raise ExportError(f"--init: {path} was trained as {ckpt.arch}, not {name}")
    keep = ckpt.classes is not None and not new_head
    if keep and ckpt.classes != classes:
        raise ExportError(
            f"--init: {path} classifies {_names(ckpt.classes)}, but the data's classes are"
            f" {_names(classes)}; give --new-head to replace its classifier with one for these"
        )
    # The head is sized to the checkpoint's first, so that the whole file is checked.
    key = head_name(source.kind, module) + ".weight"
    found = [v for k, v in ckpt.state_dict.items() if k == key or k.endswith("." + key)]
    current = module.get_submodule(head_name(source.kind, module)).get_parameter("weight")
    if len(found) == 1 and found[0].shape[0] != current.shape[0]:
        replace_head(source.kind, module, int(found[0].shape[0]))
    checkpoint.apply(module, ckpt.state_dict, what=name)
    log.info("--init: %d tensors from %s", len(ckpt.state_dict), path)
    return keep


def _names(classes: tuple[str, ...] | None) -> str:
    shown = list(classes or ())
    return str(shown) if len(shown) <= 12 else f"{len(shown)} classes ({', '.join(shown[:5])}, ...)"
