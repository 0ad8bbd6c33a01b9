"""Accuracy of exported ONNX models on the held-out validation split, as served.

Each held-out image goes from its original file bytes through the service's own decoding
and preprocessing (read from the model card) into ONNX Runtime, so the figure is what
``/predict`` answers, not what PyTorch saw during training. The split is the one
``export.train`` holds out (same ``--val-per-class`` and ``--seed``).

Given several models, it also scores their ensemble (class probabilities averaged), which
is what ``export.train --teacher`` repeated distils from: a way to see how good a teacher
is before spending a run on it.

Example::

    python -m export.evaluate models/cifar10-resnet20/1/model.onnx \\
        --data ../shared/datasets/cifar10-train.tar.gz
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from export import data
from service.engine import softmax
from service.metadata import INPUT_NAME, LOGITS_NAME, ModelCard
from service.preprocess import Preprocessor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "models", type=Path, nargs="+", metavar="model", help="exported model.onnx files"
    )
    p.add_argument("--data", required=True, help="ImageFolder directory or a .tar.gz of one")
    p.add_argument("--val-per-class", type=int, default=500, help="as in training (500)")
    p.add_argument("--seed", type=int, default=0, help="as in training (0)")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


@dataclass(frozen=True)
class Scores:
    """Correct answers on the held-out split: each model's, and their ensemble's."""

    correct: list[int]
    ensemble: int
    total: int


def evaluate(args: argparse.Namespace) -> Scores:
    """Score each model alone and all of them averaged; refuse classes other than the data's."""
    sessions = [
        ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for m in args.models
    ]
    cards = [ModelCard.from_metadata_props(s.get_modelmeta().custom_metadata_map) for s in sessions]
    files = data.read_files(args.data)
    classes = tuple(sorted({c for c, _ in files}))
    for model, card in zip(args.models, cards, strict=True):
        if classes != card.labels:
            raise ValueError(f"the data's classes {classes} are not {model}'s {card.labels}")
    targets = torch.tensor([classes.index(c) for c, _ in files])
    _, val = data.stratified_split(targets, args.val_per_class, seed=args.seed)
    # Models that share their preprocessing (the usual case) share each decoded batch.
    preprocessors = {
        card.preprocessing: Preprocessor(card.preprocessing, max_pixels=1 << 26) for card in cards
    }
    correct = [0] * len(sessions)
    ensemble = 0
    indices = val.tolist()
    for start in tqdm(range(0, len(indices), args.batch_size), desc="evaluate", unit="batch"):
        chunk = indices[start : start + args.batch_size]
        truth = targets[chunk].numpy()
        probs = np.zeros((len(chunk), len(classes)))
        batches = {
            key: np.stack([pre(files[i][1]) for i in chunk]) for key, pre in preprocessors.items()
        }
        for k, (session, card) in enumerate(zip(sessions, cards, strict=True)):
            (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: batches[card.preprocessing]})
            correct[k] += int((logits.argmax(1) == truth).sum())
            probs += softmax(logits)  # the probabilities /predict answers
        ensemble += int((probs.argmax(1) == truth).sum())
    return Scores(correct, ensemble, len(indices))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        scores = evaluate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = scores.total
    split = f"on the held-out split (seed {args.seed}, {args.val_per_class} per class)"
    for model, correct in zip(args.models, scores.correct, strict=True):
        print(f"{model}: {correct}/{total} = {100 * correct / total:.2f}% top-1 {split}")
    if len(args.models) > 1:
        n, correct = len(args.models), scores.ensemble
        print(
            f"ensemble of the {n} (probabilities averaged): "
            f"{correct}/{total} = {100 * correct / total:.2f}% top-1 {split}"
        )
    print(f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
