"""Weight files: what a checkpoint path holds, read without running code.

A torch file (``.pt``, ``.pth``, ``.th``, ``.ckpt``, ``.bin``) is read with
``torch.load(weights_only=True)``; a ``.safetensors`` file with ``safetensors.torch.load_file``;
a sharded set through its index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json``), whose ``weight_map`` names the shard files beside it. A
folder stands for the first of :data:`STANDARD_NAMES` it holds, as a Hugging Face folder does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError
from export.train import checkpoint as training

log = logging.getLogger(__name__)

STANDARD_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
INDEX_SUFFIX = ".index.json"
_SHOWN = 8  # names listed in a message before "... and N more"


@dataclass(frozen=True)
class WeightFile:
    """What a checkpoint path holds, and the hash that identifies it."""

    path: Path
    """The file read: a folder's standard file, or a sharded set's index."""
    sha256: str
    """Of the file; for a sharded set, of the index's bytes then each shard's, by name."""
    content: Any
    """A torch file's object (any layout), or the state_dict of a safetensors file or set."""


def read(path: Path) -> WeightFile:
    """Read the checkpoint at ``path`` (a file, or a folder holding a standard name).

    Raises :class:`ExportError` naming the file and what is wrong with it.
    """
    path = _resolve(path)
    if path.name.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    return WeightFile(path=path, sha256=sha256_of(path), content=_read_file(path))


def sha256_of(*paths: Path) -> str:
    """The sha256 of the files' bytes, one after another (``cat FILES | sha256sum``)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of parameter name -> tensor."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in STANDARD_NAMES:
            if (path / name).is_file():
                log.info("checkpoint: reading %s in %s", name, path)
                return path / name
        raise ExportError(f"checkpoint folder {path} holds none of {', '.join(STANDARD_NAMES)}")
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    return path


def _read_file(path: Path) -> Any:
    if path.suffix != ".safetensors":
        return training.read(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise ExportError(f"checkpoint {path} is not a valid safetensors file ({reason})") from exc


def _read_sharded(index: Path) -> WeightFile:
    weight_map = _weight_map(index)
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        listed = _listing(missing)
        noun = "shard" if len(missing) == 1 else "shards"
        raise ExportError(
            f"checkpoint index {index} names {len(missing)} {noun} missing from "
            f"{index.parent}: {listed}"
        )
    shards = [index.parent / name for name in names]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        content = _read_file(shard)
        if not is_state_dict(content):
            raise ExportError(f"checkpoint shard {shard} holds no state_dict")
        state.update(content)
    absent = [key for key in weight_map if key not in state]
    if absent:
        raise ExportError(
            f"checkpoint index {index} lists {len(absent)} tensors that no shard holds: "
            f"{_listing(absent)}"
        )
    log.info("checkpoint: %d tensors from %d shards listed in %s", len(state), len(shards), index)
    return WeightFile(path=index, sha256=sha256_of(index, *shards), content=state)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"checkpoint index {index} is not a JSON file ({exc})") from exc
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise ExportError(
            f"checkpoint index {index} has no weight_map (tensor name -> shard file name)"
        )
    return weight_map


def _listing(names: list[str]) -> str:
    more = f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
