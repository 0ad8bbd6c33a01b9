"""Re-encode an image data set as JPEG at a chosen quality, to measure what compression costs.

The CIFAR-10 copy in ``shared/datasets`` is JPEG at quality ~75 with 4:2:0 chroma, and
no lossless copy is at hand, so the accuracy lost to that first compression cannot be
measured directly. What can be measured is the slope: re-encode the set at lower
qualities, train the same recipe on each, and see how many points each step of further
loss costs. This writes such a copy as an ImageFolder directory that ``export.train`` and
``export.evaluate`` read like the original (same classes, same order, hence the same
45k/5k split), and prints how far the pixels moved (PSNR against the source).

Example::

    python -m export.reencode ../shared/datasets/cifar10-train.tar.gz runs/cifar10-q50 \\
        --quality 50
    python -m export.train --data runs/cifar10-q50 --epochs 20 --out runs/r20-q50
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from export import data

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.reencode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="ImageFolder directory or a .tar.gz of one")
    p.add_argument("out", type=Path, help="new ImageFolder directory (must not exist)")
    p.add_argument("--quality", type=int, required=True, help="JPEG quality, 1-95")
    p.add_argument("--subsampling", choices=tuple(SUBSAMPLING), default="4:2:0")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 95:
        p.error(f"--quality must be within 1-95, got {args.quality}")
    return args


def reencode(data_bytes: bytes, quality: int, subsampling: str) -> tuple[bytes, float, int]:
    """(JPEG bytes, squared error summed over its values, number of values) of one image."""
    src = data.decode_rgb(data_bytes)
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, "JPEG", quality=quality, subsampling=SUBSAMPLING[subsampling])
    diff = data.decode_rgb(buf.getvalue()).astype(np.float64) - src
    return buf.getvalue(), float((diff**2).sum()), diff.size


def run(args: argparse.Namespace) -> float:
    """Write the copy; returns its PSNR (dB) against the source over all pixels."""
    if args.out.exists():
        raise FileExistsError(f"{args.out} exists; choose a new directory")
    files = data.read_files(args.source)
    if not files:
        raise ValueError(f"{args.source}: no images found")
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted run's leftovers must not mix in
    counts: dict[str, int] = {}
    sq_err, values = 0.0, 0
    for cls, blob in tqdm(files, desc=f"re-encode q{args.quality}", unit="img"):
        # Zero-padded numbers in reading order: the directory lists in the order the
        # source was read, so stratified_split holds out the same images.
        n = counts[cls] = counts.get(cls, -1) + 1
        out, err, size = reencode(blob, args.quality, args.subsampling)
        path = tmp / cls / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out)
        sq_err, values = sq_err + err, values + size
    tmp.rename(args.out)
    mse = sq_err / values
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        psnr = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: quality {args.quality}, {args.subsampling}; "
        f"PSNR against {args.source}: {psnr:.2f} dB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
