"""Where an export goes: ``<out>/<name>/<version>/model.onnx``, and what it returns; how a
file already made is read back, and how a new one is written only once the service loads it.

Torch-free, so that every way of making a model file (export, adoption, precision variants,
a new head) shares it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.errors import ExportError
from export.onnx_verify import first_line
from service.engine import Engine, ModelLoadError
from service.metadata import MetadataError, ModelCard

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ExportResult:
    """Where the model went and what its card says; ``report`` is the verification table."""

    path: Path
    version: int
    card: ModelCard
    report: str


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, --name, --version and --overwrite: where a command writes its model (see
    :func:`target`)."""
    parser.add_argument("--out", type=Path, required=True, help="model repository, e.g. models")
    parser.add_argument("--name", required=True, help="model name: the folder under --out")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")


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


def read_model(source: Path) -> tuple[Path, bytes, onnx.ModelProto, ModelCard]:
    """A model this project made (``model.onnx`` or its version folder): its path, its bytes
    (to hash), its graph and its card, all from one read of the file."""
    path = source / "model.onnx" if source.is_dir() else source
    if not path.is_file():
        raise ExportError(f"{path} does not exist (give a model.onnx or its version folder)")
    try:
        data = path.read_bytes()
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model: {first_line(exc)}") from exc
    try:
        card = ModelCard.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    except MetadataError as exc:
        raise ExportError(
            f"{path} has no resnet-serve model card ({exc}); give a model made by "
            "python -m export (an ONNX file from elsewhere: adopt it first with "
            "python -m export FILE.onnx ...)"
        ) from exc
    return path, data, proto, card


def write_checked(proto: onnx.ModelProto, path: Path, *, what: str) -> Path:
    """``proto`` written beside ``path`` (``model.onnx.tmp``), valid ONNX that the service's
    own loader accepts; the caller renames it into place. ``what`` names it in errors."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the {what} graph is not valid ONNX: {first_line(exc)}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    try:
        Engine(tmp, providers=("cpu",))
    except ModelLoadError as exc:
        tmp.unlink()
        raise ExportError(f"the service would not load the {what} file: {exc}") from exc
    return tmp
