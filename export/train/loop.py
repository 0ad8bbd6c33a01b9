"""The training loop: SGD on a schedule, then validation and both checkpoints every epoch.

``--init`` starts from an earlier run's weights with a fresh optimizer (a warm restart);
``--resume`` continues ``last.pt`` exactly where it stopped, because every epoch draws its
order and augmentation from a generator of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from export import cifar_resnet, data
from export.train import checkpoint, reports
from export.train.augment import Augment
from export.train.checkpoint import ResumeState, TrainingCheckpoint
from export.train.distill import Teachers, distillation_loss

log = logging.getLogger("export.train")

INPUT_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Run:
    """What every epoch of one run works with, built once by :func:`train`."""

    args: argparse.Namespace
    device: torch.device
    amp_dtype: torch.dtype | None
    split: data.TrainVal
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    aug: Augment
    teachers: Teachers | None
    steps_per_epoch: int


def train(
    args: argparse.Namespace, *, device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, Any]:
    """Run the whole training on ``device``, autocast to ``amp_dtype`` unless None; returns
    the best epoch's metrics row. Bad input raises ValueError, FileNotFoundError or
    :class:`~export.errors.ExportError` (an unreadable checkpoint)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    run = _build(args, device, amp_dtype)
    history, start_epoch = _start(run)
    best_acc = max((r["val_acc"] for r in history), default=-1.0)
    best_path = args.out / "best.pt"
    for epoch in range(start_epoch, args.epochs + 1):
        train_loss, train_acc, seen, seconds = _fit_epoch(run, epoch)
        val_loss, val_acc = evaluate(run.model, run.split.val, run.aug)
        row = {
            "epoch": epoch,
            "lr": run.opt.param_groups[0]["lr"],
            "train_loss": round(train_loss, 5),
            "train_acc": round(train_acc, 5),
            "val_loss": round(val_loss, 5),
            "val_acc": round(val_acc, 5),
            "seconds": round(seconds, 1),
            "img_per_s": round(seen / seconds, 1),
        }
        history.append(row)
        log.info(
            "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0fs  %.0f img/s",
            epoch,
            args.epochs,
            row["train_loss"],
            row["train_acc"],
            val_loss,
            val_acc,
            seconds,
            row["img_per_s"],
        )
        ckpt = TrainingCheckpoint(
            arch=args.arch,
            classes=run.split.classes,
            mean=run.split.mean,
            std=run.split.std,
            state_dict=run.model.state_dict(),
            epoch=epoch,
            val_acc=val_acc,
            history=history,
            args=checkpoint.primitive_args(args),
            input_size=INPUT_SIZE,
        )
        if val_acc > best_acc:
            best_acc = val_acc
            checkpoint.save(ckpt, best_path)
        scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
        resume = ResumeState(run.opt.state_dict(), run.sched.state_dict(), scaler)
        checkpoint.save(dataclasses.replace(ckpt, resume=resume), args.out / "last.pt")
        reports.write(history, args.out)

    best = max(history, key=lambda r: r["val_acc"])
    log.info(
        "best validation accuracy %.2f%% at epoch %d -> %s",
        100 * best["val_acc"],
        best["epoch"],
        best_path,
    )
    return best


def make_scheduler(
    opt: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--schedule onecycle`` (warm-up, cosine decay) or ``step`` (the paper's), per step."""
    total = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=args.lr,
            total_steps=total,
            pct_start=0.2,
            div_factor=8.0,
            final_div_factor=200.0,
            anneal_strategy="cos",
        )
    # The paper's steps at 32k and 48k of 64k iterations, scaled to the run's length.
    milestones = [round(total * 32 / 64), round(total * 48 / 64)]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: data.Dataset, aug: Augment, batch: int = 1000
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``ds``, unaugmented, in float32."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(ds), batch):
        x = aug.normalize(ds.images[i : i + batch]).to(device)
        y = ds.targets[i : i + batch].to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    return loss_sum.item() / len(ds), correct.item() / len(ds)


def _build(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> Run:
    """The data, the model and its optimizer, schedule and loss scaler, and the teachers."""
    split = data.load_split(
        args.data,
        size=INPUT_SIZE,
        val_per_class=args.val_per_class,
        seed=args.seed,
        limit=args.limit,
        progress=not args.no_progress,
    )
    log.info(
        "data: %d train / %d validation images, %d classes; mean %s std %s",
        len(split.train),
        len(split.val),
        len(split.classes),
        [round(m, 4) for m in split.mean],
        [round(s, 4) for s in split.std],
    )
    torch.manual_seed(args.seed)
    model = cifar_resnet.build(args.arch, num_classes=len(split.classes))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    steps_per_epoch = math.ceil(len(split.train) / args.batch_size)
    sched = make_scheduler(opt, args, steps_per_epoch)
    # Loss scaling keeps float16 gradients from underflowing; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    aug = Augment(split.mean, split.std, cutout=args.cutout)
    teachers = None
    if args.teacher:
        run_split = checkpoint.Split.of(vars(args))
        teachers = Teachers(args.teacher, classes=split.classes, split=run_split)
        teachers = teachers.to(device).to(memory_format=torch.channels_last)
    log.info("device %s, mixed precision %s", device, args.amp)
    return Run(
        args, device, amp_dtype, split, model, opt, sched, scaler, aug, teachers, steps_per_epoch
    )


def _start(run: Run) -> tuple[list[dict[str, Any]], int]:
    """The history so far and the first epoch to run: after ``--resume``'s ``last.pt``, or
    from nothing (with ``--init``'s weights when given)."""
    args = run.args
    if args.init and not args.resume:
        init = checkpoint.load(args.init)
        if init.arch != args.arch or init.classes != run.split.classes:
            raise ValueError(
                f"--init: {args.init} is a {init.arch} over {list(init.classes)},"
                f" not a {args.arch} over {list(run.split.classes)}"
            )
        run.model.load_state_dict(init.state_dict)
        log.info("weights from %s (epoch %d, val_acc %.4f)", args.init, init.epoch, init.val_acc)
    if not args.resume:
        return [], 1
    last_path = args.out / "last.pt"
    if not last_path.exists():
        raise FileNotFoundError(f"--resume: {last_path} does not exist")
    last = checkpoint.load(last_path)
    if last.arch != args.arch:
        raise ValueError(f"--resume: {last_path} is a {last.arch}, not {args.arch}")
    if last.resume is None:
        raise ValueError(f"--resume: {last_path} holds no optimizer state to resume")
    run.model.load_state_dict(last.state_dict)
    run.opt.load_state_dict(last.resume.optimizer)
    run.sched.load_state_dict(last.resume.scheduler)
    if last.resume.scaler is not None:
        run.scaler.load_state_dict(last.resume.scaler)
    log.info("resumed from %s after epoch %d", last_path, last.epoch)
    return last.history, last.epoch + 1


def _fit_epoch(run: Run, epoch: int) -> tuple[float, float, int, float]:
    """One pass over the training images: (mean loss, accuracy, images, seconds)."""
    args, device, train_ds = run.args, run.device, run.split.train
    # A generator per epoch: the order and augmentation of epoch e do not depend on
    # whether the run was interrupted before it, so --resume repeats a run exactly.
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    order = torch.randperm(len(train_ds), generator=g)
    run.model.train()
    t0 = time.perf_counter()
    # Running sums stay on the device: reading them every step would stall a GPU.
    seen = 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    bar = tqdm(
        range(run.steps_per_epoch),
        desc=f"epoch {epoch}/{args.epochs}",
        unit="batch",
        disable=args.no_progress,
        leave=False,
        file=sys.stderr,
    )
    for step in bar:
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        x = run.aug(train_ds.images[idx], g).to(device, non_blocking=True)
        y = train_ds.targets[idx].to(device, non_blocking=True)
        loss, out = _step(run, x, y)
        seen += len(y)
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if step % 10 == 0 or step == run.steps_per_epoch - 1:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}",
                acc=f"{correct.item() / seen:.3f}",
                img_s=f"{seen / (time.perf_counter() - t0):.0f}",
            )
    seconds = time.perf_counter() - t0
    return loss_sum.item() / seen, correct.item() / seen, seen, seconds


def _step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One optimizer step on the batch ``x``, ``y``: (loss, logits)."""
    args, amp_dtype = run.args, run.amp_dtype
    with torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = run.model(x)
        soft = None if run.teachers is None else run.teachers(x, args.distill_temperature)
    if soft is None:
        loss = F.cross_entropy(out.float(), y)
    else:
        loss = distillation_loss(
            out.float(), y, soft, args.distill_weight, args.distill_temperature
        )
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return loss, out
