"""Checkpoints: load safely, find the state_dict inside, and apply it with a clear mismatch report.

Accepted layouts: this project's training checkpoint (:mod:`export.train.checkpoint`, which
also supplies the arch, labels, mean, std and input size); a plain state_dict; a dict
wrapping it under ``state_dict``, ``model`` or ``model_state_dict``; keys prefixed
``module.`` (DataParallel) or ``_orig_mod.`` (``torch.compile``). Files are read with
``weights_only=True`` only: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.errors import ExportError
from export.train import checkpoint as training

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 8  # keys listed per category in a mismatch message before "... and N more"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its weights plus whatever it says about the model it came from."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    arch: str | None = None
    classes: tuple[str, ...] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: Path) -> Checkpoint:
    """Read ``path`` with ``torch.load(weights_only=True)`` and find its state_dict."""
    obj = training.read(path)
    if training.is_training_checkpoint(obj):
        return _from_training(training.TrainingCheckpoint.from_dict(obj, path), path)
    state = _find_state_dict(obj, path)
    meta = obj if isinstance(obj, Mapping) and state is not obj else {}
    return Checkpoint(
        path=path,
        sha256=sha256_of(path),
        state_dict=_strip_prefixes(state),
        arch=_opt(meta, "arch", str),
        classes=tuple(str(c) for c in meta["classes"]) if meta.get("classes") else None,
        mean=_triple(meta.get("mean")),
        std=_triple(meta.get("std")),
        input_size=_opt(meta, "input_size", int),
    )


def _from_training(ckpt: training.TrainingCheckpoint, path: Path) -> Checkpoint:
    log.info(
        "checkpoint: %s of python -m export.train, epoch %d, val_acc %.4f",
        ckpt.arch,
        ckpt.epoch,
        ckpt.val_acc,
    )
    return Checkpoint(
        path=path,
        sha256=sha256_of(path),
        state_dict=ckpt.state_dict,
        arch=ckpt.arch,
        classes=ckpt.classes,
        mean=ckpt.mean,
        std=ckpt.std,
        input_size=ckpt.input_size,
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                log.info("checkpoint: using the state_dict under %r", key)
                return obj[key]
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise ExportError(
            f"checkpoint {path} holds no state_dict: expected a dict of tensors, or one under "
            f"{' / '.join(WRAPPER_KEYS)}; its top-level keys are {keys}"
        )
    raise ExportError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict "
        "(a dict of parameter name -> tensor)"
    )


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            log.info("checkpoint: stripping the %r prefix from every key", prefix)
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _opt(meta: Mapping[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    return kind(value) if value is not None else None


def _triple(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    a, b, c = (float(x) for x in value)
    return (a, b, c)


def apply(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load ``state`` into ``model`` strictly, or fail listing every difference.

    ``what`` names the model in the message (e.g. ``cifar-resnet20``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            _listing("missing key", missing),
            _listing("unexpected key", unexpected),
            _listing("shape differs", shapes, plural="shapes differ"),
        ]
        raise ExportError(f"checkpoint does not match {what}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def _listing(noun: str, items: list[str], *, plural: str | None = None) -> str:
    if not items:
        return ""
    head = ", ".join(items[:_SHOWN])
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    label = noun if len(items) == 1 else (plural or f"{noun}s")
    return f"{len(items)} {label} ({head}{more})"
