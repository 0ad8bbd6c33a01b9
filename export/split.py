"""``python -m export.split``: one side of the training split, written out as an ImageFolder.

The same split ``export.train`` and ``export.evaluate`` use (``--val-per-class`` images of
each class held out, drawn with ``--seed``), so that a quantized model is calibrated on
training images and its accuracy measured on the held-out ones, never the other way. The
files are the archive's own bytes (no re-encoding), named by their index in the data set.

Example::

    python -m export.split ../shared/datasets/cifar10-train.tar.gz --side val --out /tmp/val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from export import data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="ImageFolder directory or a .tar.gz of one")
    p.add_argument("--side", required=True, choices=("train", "val"))
    p.add_argument("--out", type=Path, required=True, help="folder to write <class>/<index>.jpg to")
    p.add_argument("--per-class", type=int, help="at most this many images of each class")
    p.add_argument("--val-per-class", type=int, default=500, help="as in training (500)")
    p.add_argument("--seed", type=int, default=0, help="as in training (0)")
    return p.parse_args(argv)


def write_split(args: argparse.Namespace) -> int:
    """Write the chosen side; returns the number of files written."""
    files = data.read_files(args.data)
    classes = sorted({c for c, _ in files})
    targets = torch.tensor([classes.index(c) for c, _ in files])
    train, val = data.stratified_split(targets, args.val_per_class, seed=args.seed)
    taken: dict[str, int] = {}
    written = 0
    for index in (train if args.side == "train" else val).tolist():
        label, payload = files[index]
        if args.per_class is not None and taken.get(label, 0) >= args.per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        folder = args.out / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").write_bytes(payload)
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out} is not empty", file=sys.stderr)
        return 2
    try:
        written = write_split(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} {args.side} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
