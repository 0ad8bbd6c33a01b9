"""Accuracy of an exported ONNX model on the held-out validation split, as served.

Each held-out image goes from its original file bytes through the service's own decoding
and preprocessing (read from the model card) into ONNX Runtime, so the figure is what
``/predict`` answers, not what PyTorch saw during training. The split is the one
``export.train`` holds out (same ``--val-per-class`` and ``--seed``).

Example::

    python -m export.evaluate models/cifar10-resnet20/1/model.onnx \\
        --data ../shared/datasets/cifar10-train.tar.gz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from export import data
from service.metadata import INPUT_NAME, LOGITS_NAME, ModelCard
from service.preprocess import Preprocessor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="an exported model.onnx")
    p.add_argument("--data", required=True, help="ImageFolder directory or a .tar.gz of one")
    p.add_argument("--val-per-class", type=int, default=500, help="as in training (500)")
    p.add_argument("--seed", type=int, default=0, help="as in training (0)")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


def evaluate(args: argparse.Namespace) -> tuple[int, int]:
    """(correct, total) on the held-out split."""
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    files = data.read_files(args.data)
    classes = tuple(sorted({c for c, _ in files}))
    if classes != card.labels:
        raise ValueError(f"the data's classes {classes} are not the model's {card.labels}")
    targets = torch.tensor([classes.index(c) for c, _ in files])
    _, val = data.stratified_split(targets, args.val_per_class, seed=args.seed)
    pre = Preprocessor(card.preprocessing, max_pixels=1 << 26)
    correct = 0
    indices = val.tolist()
    for start in tqdm(range(0, len(indices), args.batch_size), desc="evaluate", unit="batch"):
        chunk = indices[start : start + args.batch_size]
        batch = np.stack([pre(files[i][1]) for i in chunk])
        (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: batch})
        correct += int((logits.argmax(1) == targets[chunk].numpy()).sum())
    return correct, len(indices)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        correct, total = evaluate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.model}: {correct}/{total} = {100 * correct / total:.2f}% top-1 on the held-out "
        f"split (seed {args.seed}, {args.val_per_class} per class) "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
