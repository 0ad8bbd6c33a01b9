"""A fine-tuning run: the data, the network, the optimizer and schedule, handed to the
shared epoch loop (:mod:`export.train.epochs`) with the checkpoint the export reads.

The classifier learns at ``--lr``, the pretrained layers at ``--lr`` x
``--backbone-lr-scale`` (they need only nudging, and a large step would undo what they
learnt); biases and normalization parameters take no weight decay. The learning rate
warms up linearly over the first 5% of steps, then follows a cosine to zero.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from export import api
from export.finetune import folders, images, network
from export.train import checkpoint, epochs
from export.train.checkpoint import TrainingCheckpoint

log = logging.getLogger("export.finetune")

WARMUP = 0.05
"""Fraction of the steps over which the learning rate rises linearly from zero."""


def train(
    args: argparse.Namespace, *, device: torch.device, amp_dtype: torch.dtype | None
) -> dict[str, Any]:
    """Fine-tune as ``args`` say, on ``device`` (autocast to ``amp_dtype`` unless None);
    returns the best epoch's metrics row. Bad input raises :class:`ExportError`."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    found = folders.read(
        args.data, val_data=args.val_data, val_fraction=args.val_fraction, seed=args.seed
    )
    torch.manual_seed(args.seed)  # the new head's initial weights
    net = network.build(
        args.source,
        weights=args.weights,
        init=None if args.resume else args.init,
        classes=found.classes,
        new_head=args.new_head,
    )
    # The eval transform is the one the export writes into the card, at --input-size.
    pre = api.preprocessing(net.source, None, input_size=args.input_size, resize=args.resize)
    log.info(
        "preprocessing: resize %d, crop %d (%s), mean %s, std %s",
        pre.resize, pre.crop, pre.interpolation, list(pre.mean), list(pre.std),
    )  # fmt: skip
    model = net.model.to(device).to(memory_format=torch.channels_last)
    if args.freeze_bn:
        for bn in _batch_norms(model):
            bn.requires_grad_(False)
    if args.backbone_lr_scale == 0:
        head = {id(p) for p in net.head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)

    pin = device.type == "cuda"
    train_images = images.TrainImages(found.train, pre, seed=args.seed)
    order = images.EpochOrder(len(train_images), seed=args.seed)
    train_loader = images.loader(
        train_images, batch_size=args.batch_size, workers=args.workers, pin=pin, sampler=order
    )
    val_images = images.EvalImages(found.val, pre)
    val_loader = images.loader(
        val_images, batch_size=args.batch_size, workers=args.workers, pin=pin
    )
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)

    opt = _optimizer(args, model, net.head)
    sched = _schedule(opt, total=args.epochs * steps_per_epoch)
    # Loss scaling keeps float16 gradients from underflowing; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    log.info("device %s, mixed precision %s", device, amp_dtype or "off")

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order.epoch = epoch
        return images.batches(train_loader, f"epoch {epoch}")

    def train_mode() -> None:
        model.train()
        if args.freeze_bn:  # running statistics stay the pretrained ones
            for bn in _batch_norms(model):
                bn.eval()

    def snapshot(epoch: int, val_acc: float, history: list[dict[str, Any]]) -> TrainingCheckpoint:
        return TrainingCheckpoint(
            arch=args.source,
            classes=found.classes,
            mean=pre.mean,
            std=pre.std,
            state_dict=net.module.state_dict(),
            epoch=epoch,
            val_acc=val_acc,
            history=history,
            args=checkpoint.primitive_args(args),
            input_size=pre.crop,
            resize=pre.resize,
            interpolation=pre.interpolation,
            config_sha256=net.source.config_sha256,
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
        evaluate=lambda: epochs.evaluate(model, images.batches(val_loader, "validation")),
        snapshot=snapshot,
        train_mode=train_mode,
        progress=not args.no_progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    start = 1
    if args.resume:  # last.pt's weights replace those the network was built with
        history, start = epochs.resume(
            session, arch=args.source, classes=found.classes, into=net.module
        )
    return epochs.run(session, history, start)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _optimizer(
    args: argparse.Namespace, model: nn.Module, head: nn.Module
) -> torch.optim.Optimizer:
    """SGD or AdamW over four groups: head and backbone, with and without weight decay.

    The head's group comes first, so that the metrics' ``lr`` column is ``--lr``'s.
    """
    head_ids = {id(p) for p in head.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            # Biases and normalization scales (1-D) are not decayed.
            groups.setdefault((id(p) in head_ids, p.ndim > 1), []).append(p)
    params = [
        {
            "params": groups[key],
            "lr": args.lr * (1.0 if key[0] else args.backbone_lr_scale),
            "weight_decay": args.weight_decay if key[1] else 0.0,
        }
        for key in ((True, True), (True, False), (False, True), (False, False))
        if key in groups
    ]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)


def _schedule(opt: torch.optim.Optimizer, *, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over :data:`WARMUP` of the ``total`` steps, then a cosine to zero."""
    warmup = max(1, round(WARMUP * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
