"""Where an export goes: ``<out>/<name>/<version>/model.onnx``, and what it returns.

Torch-free, so that every way of making a model file (export, adoption) shares it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from export.errors import ExportError
from service.metadata import ModelCard

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ExportResult:
    """Where the model went and what its card says; ``report`` is the verification table."""

    path: Path
    version: int
    card: ModelCard
    report: str


def next_version(model_dir: Path) -> int:
    """One more than the highest numbered version under ``model_dir`` (1 when none)."""
    taken = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(taken, default=0) + 1


def target(out: Path, name: str, version: int | None, *, overwrite: bool) -> tuple[Path, int]:
    """The version folder to write (not created yet) and its number; refuses to overwrite."""
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r} may hold only letters, digits, '.', '_' and '-'")
    if version is None:
        version = next_version(out / name)
    elif version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    target = out / name / str(version)
    if (target / "model.onnx").exists() and not overwrite:
        raise ExportError(f"{target / 'model.onnx'} exists; pick another --version or --overwrite")
    return target, version
