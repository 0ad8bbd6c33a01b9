"""The training checkpoint: what ``python -m export.train`` writes and every reader takes.

One format, ``resnet-serve-checkpoint/1``, for three readers: the exporter
(``python -m export --checkpoint``), ``--init`` and ``--resume``, and ``--teacher``. It holds
tensors and primitives only, so :func:`read` loads it with ``torch.load(weights_only=True)``:
a checkpoint never runs code. ``last.pt`` adds the optimizer's and scheduler's state (and
the fp16 loss scaler's) for ``--resume``; ``best.pt`` leaves them out.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.errors import ExportError

FORMAT = "resnet-serve-checkpoint/1"
_REQUIRED = ("arch", "classes", "mean", "std", "model", "epoch", "val_acc", "history", "args")


@dataclass(frozen=True)
class Split:
    """Which images a run held out for validation: equal splits hold out the same images."""

    seed: int | None
    val_per_class: int | None
    limit: int | None

    @classmethod
    def of(cls, args: Mapping[str, Any]) -> Split:
        """The split of a run's flags (``vars(args)``, or the ``args`` a checkpoint keeps)."""
        return cls(args.get("seed"), args.get("val_per_class"), args.get("limit"))


@dataclass(frozen=True)
class ResumeState:
    """What ``--resume`` needs besides the weights; only ``last.pt`` carries it."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None
    """The fp16 loss scaler's state; None when the run had no loss scaling."""


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A trained model with what serving it needs (labels, normalization, input size) and
    what continuing its training needs (its epoch, history, flags and resume state).

    ``arch`` is the exporter's SOURCE: a CIFAR ResNet of ``python -m export.train``, or the
    torchvision name, ``timm/<name>`` or Hub folder that ``python -m export.finetune`` started
    from.
    """

    arch: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state_dict: dict[str, Tensor]
    epoch: int
    val_acc: float
    history: list[dict[str, Any]]
    """One metrics row per epoch so far, as in ``metrics.csv``."""
    args: dict[str, Any]
    """The run's flags, as primitives (see :func:`primitive_args`)."""
    input_size: int = 32
    resize: int | None = None
    """The shorter side before the centre crop, where the run fixed one (fine-tuning: the
    source's own eval resize); None leaves it to the exporter's default for the source."""
    interpolation: str | None = None
    """The resize filter of the eval transform (bilinear, bicubic, nearest), likewise."""
    config_sha256: str | None = None
    """The Hub folder's config.json hash, for a model fine-tuned from a folder: the export
    rebuilds the architecture from that folder and checks that it is the same one."""
    resume: ResumeState | None = None

    @property
    def split(self) -> Split:
        """The validation split the run held out (older runs may lack some of its flags)."""
        return Split.of(self.args)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout, every tensor on the CPU so that it loads on any machine."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "arch": self.arch,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            **{k: v for k, v in self._extras().items() if v is not None},
            "epoch": self.epoch,
            "val_acc": self.val_acc,
            "model": _to_cpu(self.state_dict),
            "history": self.history,
            "args": self.args,
        }
        if self.resume is not None:
            out["optimizer"] = _to_cpu(self.resume.optimizer)
            out["scheduler"] = self.resume.scheduler
            if self.resume.scaler is not None:
                out["scaler"] = self.resume.scaler
        return out

    def _extras(self) -> dict[str, Any]:
        """Fields written only when set, so that older layouts stay as they were."""
        return {
            "resize": self.resize,
            "interpolation": self.interpolation,
            "config_sha256": self.config_sha256,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: Path) -> TrainingCheckpoint:
        """Check and type the on-disk layout read from ``path``; raises :class:`ExportError`."""
        missing = [key for key in _REQUIRED if key not in obj]
        if missing:
            raise ExportError(f"training checkpoint {path} lacks {', '.join(missing)}")
        state = obj["model"]
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
        ):
            raise ExportError(f"training checkpoint {path}: 'model' is not a state_dict")
        try:
            ckpt = cls(
                arch=str(obj["arch"]),
                classes=tuple(str(c) for c in obj["classes"]),
                mean=_triple(obj["mean"]),
                std=_triple(obj["std"]),
                state_dict=dict(state),
                epoch=int(obj["epoch"]),
                val_acc=float(obj["val_acc"]),
                history=list(obj["history"]),
                args=dict(obj["args"]),
                input_size=int(obj.get("input_size", 32)),
                resize=_optional(obj, "resize", int),
                interpolation=_optional(obj, "interpolation", str),
                config_sha256=_optional(obj, "config_sha256", str),
                resume=(
                    ResumeState(obj["optimizer"], obj["scheduler"], obj.get("scaler"))
                    if "optimizer" in obj and "scheduler" in obj
                    else None
                ),
            )
        except (TypeError, ValueError) as exc:
            raise ExportError(f"training checkpoint {path} is malformed: {exc}") from exc
        if obj.get("num_classes", len(ckpt.classes)) != len(ckpt.classes):
            raise ExportError(
                f"training checkpoint {path} says {obj['num_classes']} classes"
                f" but names {len(ckpt.classes)}"
            )
        return ckpt


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is in this module's format (else: some other layout)."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def read(path: Path) -> Any:
    """Whatever ``path`` holds, read with ``torch.load(weights_only=True)`` onto the CPU.

    Any checkpoint, this format or another's; raises :class:`ExportError` saying why a file
    cannot be read, and what to do when it pickles code.
    """
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
            reason = detail.group(1).strip() if detail else type(exc).__name__
            raise ExportError(f"checkpoint {path} is not a readable torch file ({reason})") from exc
        raise ExportError(
            f"checkpoint {path} cannot be loaded with weights_only=True: it pickles "
            f"{found.group(1)}, and loading it would run code; if you trust the file, re-save "
            f"its weights alone, e.g. torch.save(torch.load('{path}', weights_only=False)"
            "['state_dict'], 'weights.pt') (for a pickled model: .state_dict()), or save "
            "them with safetensors.torch.save_file"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ExportError(f"checkpoint {path} is not a readable torch file: {exc}") from exc


def load(path: Path) -> TrainingCheckpoint:
    """The training checkpoint at ``path``; raises :class:`ExportError` for any other file."""
    obj = read(path)
    if not is_training_checkpoint(obj):
        raise ExportError(
            f"{path} is not a checkpoint of python -m export.train (format {FORMAT!r})"
        )
    return TrainingCheckpoint.from_dict(obj, path)


def save(ckpt: TrainingCheckpoint, path: Path) -> None:
    """Write ``ckpt`` to ``path`` through a temporary file, so that an interrupted run
    never leaves a half-written checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt.to_dict(), tmp)
    os.replace(tmp, path)


def primitive_args(args: argparse.Namespace) -> dict[str, Any]:
    """A run's flags as primitives (paths as strings), which ``weights_only`` loading accepts."""

    def primitive(v: Any) -> Any:
        if isinstance(v, list):
            return [primitive(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return {k: primitive(v) for k, v in vars(args).items()}


def _to_cpu(obj: Any) -> Any:
    """A state dict with every tensor on the CPU: checkpoints load on any machine."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _optional(obj: Mapping[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    return None if value is None else kind(value)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in values)
    return (a, b, c)
