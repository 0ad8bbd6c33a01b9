"""The model repository on disk: ``<root>/<name>/<version>/model.onnx``.

Versions are positive integers; the highest is the latest. An optional
``<root>/<name>/config.json`` overrides the batching settings for every version of that
model, e.g. ``{"max_batch_size": 16, "max_delay_ms": 2, "max_queue_size": 256,
"instances": 2}``, and
``"default": true`` makes it the model of requests that name none when the repository
serves several (the ``default_model`` setting, when set, wins).
Anything else in the tree is ignored, with a warning where it looks like a mistake.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RepositoryError(RuntimeError):
    """The repository directory itself is unusable (missing, not a directory)."""


class BatchingOverrides(BaseModel):
    """What a model's ``config.json`` may set; unset fields keep the service defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_delay_ms: float | None = Field(default=None, ge=0.0, le=10_000.0)
    max_queue_size: int | None = Field(default=None, ge=1)
    instances: int | None = Field(
        default=None, ge=1, le=64, description="Batches that may run at once (Triton's count)."
    )
    provider_options: dict[str, dict[str, str | int | float | bool]] = Field(
        default_factory=dict,
        description="Execution provider options for this model, over the service's "
        '(the provider_options setting), e.g. {"tensorrt": {"trt_fp16_enable": true}}.',
    )
    default: bool = Field(
        default=False, description="The model of requests that name none (one per repository)."
    )


@dataclass(frozen=True)
class ModelEntry:
    """One model directory: its versions, and its overrides or why they could not be read."""

    name: str
    versions: dict[int, Path] = field(default_factory=dict)
    overrides: BatchingOverrides = field(default_factory=BatchingOverrides)
    config_error: str | None = None

    @property
    def latest(self) -> int:
        return max(self.versions)


def scan(root: Path) -> dict[str, ModelEntry]:
    """Every model under ``root`` that has at least one version, by name."""
    if not root.exists():
        raise RepositoryError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise RepositoryError(f"model directory {root} is not a directory")
    models = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        entry = scan_model(model_dir)
        if entry is not None:
            models[entry.name] = entry
    return models


def scan_model(model_dir: Path) -> ModelEntry | None:
    """One model directory, or None (with a warning) when it holds no servable version."""
    name = model_dir.name
    if name.startswith("."):
        return None
    if not NAME_PATTERN.match(name):
        log.warning("skipping %s: model names use letters, digits, '.', '_' and '-'", model_dir)
        return None
    versions = {}
    for version_dir in model_dir.iterdir():
        if not version_dir.is_dir():
            continue
        if not version_dir.name.isdigit() or int(version_dir.name) < 1:
            log.warning("skipping %s: versions are positive integers", version_dir)
            continue
        # exists(), not is_file(): a model may be a symlink, or a pipe it is streamed through.
        if (version_dir / MODEL_FILE).exists():
            versions[int(version_dir.name)] = version_dir / MODEL_FILE
        else:
            log.warning("skipping %s: no %s in it", version_dir, MODEL_FILE)
    if not versions:
        log.warning("skipping %s: no <version>/%s under it", model_dir, MODEL_FILE)
        return None
    overrides, error = read_overrides(model_dir / CONFIG_FILE)
    return ModelEntry(name, dict(sorted(versions.items())), overrides, error)


def read_overrides(path: Path) -> tuple[BatchingOverrides, str | None]:
    """A model's batching overrides, or the defaults plus the reason the file was rejected."""
    if not path.exists():
        return BatchingOverrides(), None
    try:
        return BatchingOverrides.model_validate(json.loads(path.read_text())), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        return BatchingOverrides(), f"{path} is invalid: {exc}"
