"""``python -m export.train``: the flags, the checks that need no data, and the exit status
(0 when the run finishes, 2 with a one-line ``error: ...`` for bad input)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import export.train as package
from export.errors import ExportError
from export.train import loop

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``python -m export.train`` (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m export.train",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        default="cifar-resnet20",
        help="cifar-resnet<6n+2>[-b] or cifar-preact-resnet<9n+2> (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder directory, .tar.gz of one, or torchvision:cifar10 (online)",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--lr",
        type=float,
        default=0.2,
        help="peak learning rate (onecycle) or initial one (step) (default: %(default)s)",
    )
    p.add_argument("--schedule", choices=("onecycle", "step"), default="onecycle")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--val-per-class",
        type=int,
        default=500,
        help="images of each class held out for validation (default: 500, i.e. 45k/5k)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cutout",
        type=int,
        default=0,
        metavar="SIZE",
        help="also blank a random SIZE x SIZE square of each training image (Cutout,"
        " DeVries & Taylor 2017; not in the paper's recipe; 16 is theirs for CIFAR-10)"
        " (default: 0, off)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="use only about this many images (smoke runs)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--amp",
        choices=AMP_DTYPES,
        default="none",
        help="mixed precision: bf16 (Ampere+ GPUs, CPUs with AVX-512 BF16/AMX) or fp16"
        " (CUDA only, with loss scaling) (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights (best.pt or last.pt of an earlier run of"
        " the same --arch and split) with a fresh optimizer and schedule: a warm restart",
    )
    p.add_argument(
        "--teacher",
        type=Path,
        action="append",
        default=[],
        metavar="CKPT",
        help="distil from this trained model (a checkpoint of this command, any CIFAR --arch,"
        " trained on the same split); repeat it for an ensemble, whose probabilities are"
        " averaged (Hinton et al. 2015; not in the paper's recipe)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.9,
        help="weight of the teacher's soft targets in the loss; the labels get the rest"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=4.0,
        help="softmax temperature of the soft targets (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def prepare(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """Set the thread count and check the flags that need no data: (device, autocast dtype).

    Raises ValueError for a device this machine lacks, fp16 off CUDA, or distillation
    settings out of range.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = AMP_DTYPES[args.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16")
    if args.teacher and not (0.0 <= args.distill_weight <= 1.0 and args.distill_temperature > 0):
        raise ValueError("--distill-weight must be in [0, 1], --distill-temperature > 0")
    return device, amp_dtype


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, and return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        device, amp_dtype = prepare(args)
        loop.train(args, device=device, amp_dtype=amp_dtype)
    except (ValueError, FileNotFoundError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
