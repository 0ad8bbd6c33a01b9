"""Hub folders: a model directory as ``huggingface-cli download`` leaves it.

``config.json`` says which library wrote the folder: ``architecture`` for timm
(:mod:`export.timm_source`), ``"model_type": "resnet"`` for transformers
(:mod:`export.hf_source`). The weights beside it are read with :func:`export.checkpoint.load`,
like any other weights file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from torch import nn

from export import builders, checkpoint
from export.checkpoint import sha256_of
from export.errors import ExportError
from export.weights import STANDARD_NAMES

log = logging.getLogger(__name__)

CONFIG = "config.json"
EXPECTED = 'config.json with `architecture` (timm) or `"model_type": "resnet"` (transformers)'
_SHOWN = 8


def build(folder: Path) -> builders.Source:
    """The model a Hub folder holds, with its weights loaded and its card's defaults."""
    config, config_sha256 = read_config(folder)
    kind = kind_of(folder, config)
    weights = weights_file(folder)
    if kind == "timm":
        from export import timm_source

        return timm_source.from_folder(folder, config, config_sha256=config_sha256, weights=weights)
    from export import hf_source

    return hf_source.from_folder(folder, config, config_sha256=config_sha256, weights=weights)


def build_fine_tuned(
    folder: Path, *, num_classes: int | None, config_sha256: str
) -> builders.Source:
    """The architecture a Hub folder describes, with a ``num_classes``-way head and no
    weights loaded: a checkpoint fine-tuned from this folder (``python -m export.finetune``)
    supplies them. Its config must be the one the fine-tuning read (``config_sha256``)."""
    config, found = read_config(folder)
    if found != config_sha256:
        raise ExportError(
            f"the checkpoint was fine-tuned from a Hub folder whose {CONFIG} has sha256"
            f" {config_sha256[:12]}..., but {folder}/{CONFIG} has {found[:12]}...: export it"
            " with the folder it was fine-tuned from"
        )
    if kind_of(folder, config) == "timm":
        from export import timm_source

        return timm_source.from_folder(
            folder, config, config_sha256=found, weights=None, num_classes=num_classes
        )
    from export import hf_source

    return hf_source.from_folder(
        folder, config, config_sha256=found, weights=None, num_classes=num_classes
    )


def read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """``config.json`` as a dict, and its SHA-256 (the card records which config it was)."""
    path = folder / CONFIG
    if not path.is_file():
        raise ExportError(
            f"{folder} is not a Hub model folder: expected {EXPECTED}; found {listing(folder)}"
        )
    return read_json(path), sha256_of(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line reason why not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ExportError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def kind_of(folder: Path, config: dict[str, Any]) -> Literal["timm", "transformers"]:
    """Which library wrote ``config``, or a one-line reason why neither did."""
    if isinstance(config.get("architecture"), str):
        return "timm"
    model_type = config.get("model_type")
    if model_type == "resnet":
        return "transformers"
    if isinstance(model_type, str):
        archs = config.get("architectures") or []
        what = f" ({', '.join(map(str, archs))})" if archs else ""
        raise ExportError(
            f"{folder}/{CONFIG} describes a transformers {model_type!r} model{what}, not a "
            'ResNet: expected "model_type": "resnet"'
        )
    keys = ", ".join(list(config)[:_SHOWN]) or "none"
    raise ExportError(
        f"{folder}/{CONFIG} is neither a timm nor a transformers config: expected {EXPECTED}; "
        f"its keys are {keys}"
    )


def weights_file(folder: Path) -> Path:
    """The folder's weights file (single or a sharded set's index, safetensors first, as
    both libraries load them), or a reason naming what was expected and what was found."""
    for name in STANDARD_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ExportError(
        f"{folder} has no weights file: expected one of {', '.join(STANDARD_NAMES)} beside "
        f"{CONFIG}; found {listing(folder)}"
    )


def load_weights(model: nn.Module, weights: Path, *, what: str) -> checkpoint.Checkpoint:
    """The folder's weights into ``model``, read and applied like any other weights file."""
    ckpt = checkpoint.load(weights)
    checkpoint.apply(model, ckpt.state_dict, what=what)
    log.info("loaded %d tensors from %s", len(ckpt.state_dict), weights)
    return ckpt


def cannot_build(library: str, what: str, folder: Path, exc: Exception) -> ExportError:
    """The one-line reason for a config the library refuses to build a model from."""
    return ExportError(
        f"{library} cannot build {what} from {folder}/{CONFIG}: {type(exc).__name__}: {exc}"
    )


def repo_name(folder: Path) -> str:
    """``org/name`` for a folder in the Hub cache (``models--org--name/snapshots/<rev>``),
    else the folder's own name."""
    folder = folder.resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return folder.name


def listing(folder: Path) -> str:
    """The visible files of ``folder``, a few of them, for an error message."""
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return "an empty folder"
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
