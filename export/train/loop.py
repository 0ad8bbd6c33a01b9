"""The CIFAR recipe's run: its data, model, optimizer and schedule, handed to the shared
epoch loop (:mod:`export.train.epochs`) with SGD on a schedule, validation and both
checkpoints every epoch.

``--init`` starts from an earlier run's weights with a fresh optimizer (a warm restart);
``--resume`` continues ``last.pt`` exactly where it stopped, because every epoch draws its
order and augmentation from a generator of its own.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from export import cifar_resnet, data
from export.train import checkpoint, epochs
from export.train.augment import Augment
from export.train.checkpoint import TrainingCheckpoint
from export.train.distill import Teachers, distillation_loss

log = logging.getLogger("export.train")

INPUT_SIZE = 32


def train(
    args: argparse.Namespace, *, device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, Any]:
    """Run the whole training on ``device``, autocast to ``amp_dtype`` unless None; returns
    the best epoch's metrics row. Bad input raises ValueError, FileNotFoundError or
    :class:`~export.errors.ExportError` (an unreadable checkpoint)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    session, classes = _build(args, device, amp_dtype)
    history, start_epoch = _start(args, session, classes)
    return epochs.run(session, history, start_epoch)


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


def evaluate(
    model: nn.Module, ds: data.Dataset, aug: Augment, batch: int = 1000
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``ds``, unaugmented, in float32."""
    batches = (
        (aug.normalize(ds.images[i : i + batch]), ds.targets[i : i + batch])
        for i in range(0, len(ds), batch)
    )
    return epochs.evaluate(model, batches)


def _build(
    args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[epochs.Session, tuple[str, ...]]:
    """The data, the model and its optimizer, schedule and loss scaler, and the teachers,
    as a session of the shared loop; and the data's classes."""
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

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator per epoch: the order and augmentation of epoch e do not depend on
        # whether the run was interrupted before it, so --resume repeats a run exactly.
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(split.train), generator=g)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            yield aug(split.train.images[idx], g), split.train.targets[idx]

    def loss(logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
        if teachers is None:
            return epochs.cross_entropy(logits, targets, inputs)
        soft = teachers(inputs, args.distill_temperature)
        return distillation_loss(
            logits.float(), targets, soft, args.distill_weight, args.distill_temperature
        )

    def snapshot(epoch: int, val_acc: float, history: list[dict[str, Any]]) -> TrainingCheckpoint:
        return TrainingCheckpoint(
            arch=args.arch,
            classes=split.classes,
            mean=split.mean,
            std=split.std,
            state_dict=model.state_dict(),
            epoch=epoch,
            val_acc=val_acc,
            history=history,
            args=checkpoint.primitive_args(args),
            input_size=INPUT_SIZE,
        )

    session = epochs.Session(
        model=model,
        opt=opt,
        sched=sched,
        scaler=scaler,
        device=device,
        amp_dtype=amp_dtype,
        epochs=args.epochs,
        out=args.out,
        steps_per_epoch=steps_per_epoch,
        batches=batches,
        evaluate=lambda: evaluate(model, split.val, aug),
        snapshot=snapshot,
        loss=loss,
        progress=not args.no_progress,
    )
    return session, split.classes


def _start(
    args: argparse.Namespace, session: epochs.Session, classes: tuple[str, ...]
) -> tuple[list[dict[str, Any]], int]:
    """The history so far and the first epoch to run: after ``--resume``'s ``last.pt``, or
    from nothing (with ``--init``'s weights when given)."""
    if args.init and not args.resume:
        init = checkpoint.load(args.init)
        if init.arch != args.arch or init.classes != classes:
            raise ValueError(
                f"--init: {args.init} is a {init.arch} over {list(init.classes)},"
                f" not a {args.arch} over {list(classes)}"
            )
        session.model.load_state_dict(init.state_dict)
        log.info("weights from %s (epoch %d, val_acc %.4f)", args.init, init.epoch, init.val_acc)
    if not args.resume:
        return [], 1
    return epochs.resume(session, arch=args.arch, classes=classes)
