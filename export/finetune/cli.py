"""``python -m export.finetune``: the flags, their checks, and the exit status (0 when the
run finishes; 2 with a one-line ``error: ...`` for bad input; 1 for an unexpected failure,
whose traceback ``--debug`` shows)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import export.finetune as package
from export.errors import ExportError, configure_logging, failed
from export.finetune import run
from export.train.cli import AMP_DTYPES, resolve_device

DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
MAX_WORKERS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of ``python -m export.finetune`` (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m export.finetune",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="the model, as python -m export takes it")
    start = p.add_argument_group("starting weights (default: the source's own, else random)")
    start.add_argument(
        "--weights",
        help="torchvision weights name (IMAGENET1K_V2, DEFAULT) or timm pretrained tag"
        " (a1_in1k), downloaded once, so it needs the network; none: random weights",
    )
    start.add_argument(
        "--init", type=Path, metavar="CKPT", help="any checkpoint python -m export reads"
    )
    start.add_argument(
        "--new-head",
        action="store_true",
        help="replace the classifier of an --init checkpoint that names other classes",
    )
    io = p.add_argument_group("data and output")
    io.add_argument(
        "--data", type=Path, required=True, help="ImageFolder: one folder of images per class"
    )
    io.add_argument("--val-data", type=Path, help="validation ImageFolder (default: a split)")
    io.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each class held out when there is no --val-data (default: %(default)s)",
    )
    io.add_argument("--out", type=Path, required=True, help="run directory")
    io.add_argument(
        "--input-size",
        type=int,
        metavar="PX",
        help="side of the model input (default: the source's, e.g. 224); smaller is faster",
    )
    io.add_argument("--resize", type=int, metavar="PX", help="shorter side before the eval crop")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    opt.add_argument(
        "--lr", type=float, help="the classifier's peak learning rate (sgd 0.01, adamw 0.001)"
    )
    opt.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=0.1,
        help="the pretrained layers' learning rate as a multiple of --lr; 0 freezes them"
        " (default: %(default)s)",
    )
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD's (default: 0.9)")
    opt.add_argument("--weight-decay", type=float, help="(sgd 1e-4, adamw 0.05)")
    opt.add_argument(
        "--freeze-bn",
        action="store_true",
        help="keep the batch norms' statistics and parameters as they were (small batches)",
    )
    opt.add_argument("--seed", type=int, default=0)
    hw = p.add_argument_group("hardware")
    hw.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)",
    )
    hw.add_argument(
        "--amp",
        choices=("auto", *AMP_DTYPES),
        default="auto",
        help="mixed precision: auto is bf16 on a CUDA GPU that has it, else fp16 (with loss"
        " scaling), and none on the CPU (default: auto)",
    )
    hw.add_argument(
        "--workers",
        type=int,
        help="processes decoding images, 0 for the training process (default: on a GPU one per"
        f" core, at most {MAX_WORKERS}; on the CPU 0, as the training step needs every core)",
    )
    hw.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if args.weights is not None and args.weights.lower() == "none":
        args.weights = None
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.optimizer]
    return args


def prepare(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """Check the flags that need no data and settle the defaults that depend on the device:
    (device, autocast dtype). Raises ExportError."""
    checks = (
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (0 <= args.val_fraction < 1, f"--val-fraction must be in [0, 1), got {args.val_fraction}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.backbone_lr_scale >= 0, "--backbone-lr-scale must be >= 0"),
        (args.workers is None or args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.weights is None or args.init is None, "give --weights or --init, not both"),
        (not args.new_head or args.init is not None, "--new-head applies to --init only"),
    )
    for ok, message in checks:
        if not ok:
            raise ExportError(message)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if args.workers is None:
        args.workers = min(MAX_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0
    if args.amp == "auto":
        if device.type != "cuda":
            return device, None
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amp_dtype = AMP_DTYPES[args.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ExportError("--amp fp16 needs a CUDA device")
    return device, amp_dtype


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, fine-tune, and return the exit status."""
    args = parse_args(argv)
    configure_logging(debug=args.debug)
    try:
        device, amp_dtype = prepare(args)
        run.train(args, device=device, amp_dtype=amp_dtype)
    except Exception as exc:
        if args.debug:
            raise
        return failed(exc)
    return 0
