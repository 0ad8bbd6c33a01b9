"""Checkpoints: load safely, find the state_dict inside, and apply it with a clear mismatch report.

Files: a torch file, safetensors, a sharded set or a Hugging Face folder (:mod:`export.weights`),
read without running code. Layouts: this project's training checkpoint
(:mod:`export.train.checkpoint`, which also supplies the arch, labels, mean, std and input
size, and from fine-tuning the resize and filter); a plain state_dict; a dict wrapping it
under ``state_dict`` (as Lightning's ``.ckpt`` does), ``model`` or ``model_state_dict``. Keys
may carry any prefix a wrapper adds: :func:`apply` fits them to the model's own
(:mod:`export.prefixes`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import prefixes, weights
from export.errors import ExportError
from export.train import checkpoint as training
from export.weights import sha256_of as sha256_of

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_SHOWN = 8  # keys listed per category in a mismatch message before "... and N more"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its weights plus whatever it says about the model it came from."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    """Keys as saved (prefixes included), with torch's ``_metadata`` when the file had it."""
    arch: str | None = None
    classes: tuple[str, ...] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    config_sha256: str | None = None
    """For a model fine-tuned from a Hub folder: that folder's config.json hash."""


def load(path: Path) -> Checkpoint:
    """Read ``path`` (any file format above, or a folder holding one) and find its state_dict.

    The one entry point for every format; raises :class:`ExportError` saying what is wrong.
    """
    file = weights.read(path)
    obj = file.content
    if training.is_training_checkpoint(obj):
        return _from_training(training.TrainingCheckpoint.from_dict(obj, file.path), file)
    if isinstance(obj, Mapping) and "pytorch-lightning_version" in obj:
        log.info(
            "checkpoint: Lightning %s, epoch %s, global step %s",
            obj["pytorch-lightning_version"],
            obj.get("epoch"),
            obj.get("global_step"),
        )
    state = _find_state_dict(obj, file.path)
    meta = obj if isinstance(obj, Mapping) and state is not obj else {}
    return Checkpoint(
        path=file.path,
        sha256=file.sha256,
        state_dict=state,
        arch=_opt(meta, "arch", str),
        classes=tuple(str(c) for c in meta["classes"]) if meta.get("classes") else None,
        mean=_triple(meta.get("mean")),
        std=_triple(meta.get("std")),
        input_size=_opt(meta, "input_size", int),
    )


def _from_training(ckpt: training.TrainingCheckpoint, file: weights.WeightFile) -> Checkpoint:
    log.info(
        "checkpoint: %s of python -m export.train, epoch %d, val_acc %.4f",
        ckpt.arch,
        ckpt.epoch,
        ckpt.val_acc,
    )
    return Checkpoint(
        path=file.path,
        sha256=file.sha256,
        state_dict=ckpt.state_dict,
        arch=ckpt.arch,
        classes=ckpt.classes,
        mean=ckpt.mean,
        std=ckpt.std,
        input_size=ckpt.input_size,
        resize=ckpt.resize,
        interpolation=ckpt.interpolation,
        config_sha256=ckpt.config_sha256,
    )


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if weights.is_state_dict(obj):
        return obj if isinstance(obj, dict) else dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if weights.is_state_dict(obj.get(key)):
                log.info("checkpoint: using the state_dict under %r", key)
                return _find_state_dict(obj[key], path)
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise ExportError(
            f"checkpoint {path} holds no state_dict: expected a dict of tensors, or one under "
            f"{' / '.join(WRAPPER_KEYS)}; its top-level keys are {keys}"
        )
    raise ExportError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict "
        "(a dict of parameter name -> tensor)"
    )


def _opt(meta: Mapping[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    return kind(value) if value is not None else None


def _triple(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    a, b, c = (float(x) for x in value)
    return (a, b, c)


def apply(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load ``state`` into ``model`` as ``load_state_dict(strict=True)`` does, once its keys
    carry the prefix that fits the model's; or fail listing every difference.

    torch decides what loads (a BatchNorm saved before ``num_batches_tracked`` existed does,
    as torch's own version check allows); the report is built only when it refuses. ``what``
    names the model in the message (e.g. ``cifar-resnet20``). On failure the model is left
    partly loaded.
    """
    rekey, fitted = prefixes.fit(state, list(model.state_dict()), what=what)
    try:
        model.load_state_dict(fitted, strict=True)
    except RuntimeError as exc:
        how = rekey.note(list(state))
        raise ExportError(
            f"checkpoint does not match {what}{how}: {_differences(model, fitted, exc)}"
        ) from exc


def _differences(model: nn.Module, state: Mapping[str, torch.Tensor], refusal: RuntimeError) -> str:
    """What torch refused, as lists: missing and unexpected keys (torch's own, from a lenient
    load without the tensors whose shapes differ) and the shapes that differ."""
    expected = model.state_dict()
    differ = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    lenient = OrderedDict((k, v) for k, v in state.items() if k not in differ)
    lenient._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    try:
        found = model.load_state_dict(lenient, strict=False)
    except RuntimeError:
        found = None
    if found is None or not (found.missing_keys or found.unexpected_keys or differ):
        return " ".join(str(refusal).split())
    parts = [
        _listing("missing key", [k for k in found.missing_keys if k not in differ]),
        _listing("unexpected key", list(found.unexpected_keys)),
        _listing(
            "shape differs",
            [
                f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
                for k in differ
            ],
            plural="shapes differ",
        ),
    ]
    return "; ".join(p for p in parts if p)


def _listing(noun: str, items: list[str], *, plural: str | None = None) -> str:
    if not items:
        return ""
    head = ", ".join(items[:_SHOWN])
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    label = noun if len(items) == 1 else (plural or f"{noun}s")
    return f"{len(items)} {label} ({head}{more})"
