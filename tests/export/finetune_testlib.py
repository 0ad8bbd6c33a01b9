"""Helpers of the fine-tuning tests: ImageFolders of real JPEGs, the flags of a quick run,
and reading an exported model back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.finetune import cli
from service.metadata import ModelCard
from service.preprocess import Preprocessor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-val"
CLASSES = ("bird", "cat", "dog")


def image_folder(
    root: Path, classes: tuple[str, ...] = CLASSES, *, take: slice = slice(None)
) -> Path:
    """``root/<class>/<jpeg>``: real CIFAR-10 JPEGs of the fixtures (five per class), the
    ``take`` of them."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((FIXTURES / name).glob("*.jpg"))[take]:
            shutil.copy(path, root / name / path.name)
    return root


def quick(*extra: str) -> list[str]:
    """Flags of a run of seconds: one epoch, batches of 8, no loader processes."""
    return ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", *extra]


def finetune(source: str, data: Path, out: Path, *extra: str) -> int:
    """``python -m export.finetune SOURCE --data DATA --out OUT`` with :func:`quick`'s flags."""
    return cli.main([source, "--data", str(data), "--out", str(out), *quick(*extra)])


def card_of(path: Path) -> ModelCard:
    return ModelCard.from_metadata_props(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    )


def served(model: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs as the service preprocesses ``files`` for ``model``, ONNX Runtime's logits)."""
    pre = Preprocessor(card_of(model).preprocessing, max_pixels=1 << 26)
    x = np.stack([pre(f.read_bytes()) for f in files])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    return x, logits
