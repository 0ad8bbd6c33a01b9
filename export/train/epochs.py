"""The epoch loop every training recipe shares: the CIFAR recipe (:mod:`export.train.loop`)
and fine-tuning (:mod:`export.finetune`).

A recipe builds a :class:`Session` (its model, optimizer, schedule, batches, evaluation and
checkpoint contents); :func:`run` then trains it epoch by epoch with a progress bar, and
after each epoch validates, logs a metrics row, writes ``best.pt`` and ``last.pt`` and
rewrites ``metrics.csv`` and ``curve.png``. :func:`resume` continues from ``last.pt``.
Keeping one loop means both recipes report, checkpoint and resume the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from export.errors import ExportError
from export.train import checkpoint, reports
from export.train.checkpoint import ResumeState, TrainingCheckpoint

log = logging.getLogger("export.train")

Batches = Iterable[tuple[Tensor, Tensor]]
"""(inputs, targets) pairs: inputs float32 NCHW, normalized; targets int64 class indices."""


def cross_entropy(logits: Tensor, targets: Tensor, inputs: Tensor) -> Tensor:
    """The plain objective: cross-entropy on the labels (``inputs`` unused)."""
    return F.cross_entropy(logits.float(), targets)


@dataclasses.dataclass(frozen=True)
class Session:
    """One run as the shared loop sees it, built by a recipe."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    """Stepped once per batch."""
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    """Autocast dtype of the forward pass, None for float32."""
    epochs: int
    out: Path
    steps_per_epoch: int
    batches: Callable[[int], Batches]
    """The training batches of an epoch (1-based), on the CPU; the same epoch gives the
    same batches, so that a resumed run repeats an uninterrupted one."""
    evaluate: Callable[[], tuple[float, float]]
    """(mean loss, accuracy) on the validation images."""
    snapshot: Callable[[int, float, list[dict[str, Any]]], TrainingCheckpoint]
    """The checkpoint after (epoch, validation accuracy, history), without resume state."""
    loss: Callable[[Tensor, Tensor, Tensor], Tensor] = cross_entropy
    """(logits, targets, inputs) -> loss, run under autocast (distillation reads inputs)."""
    train_mode: Callable[[], None] | None = None
    """Puts the model in training mode (default ``model.train()``; a recipe that keeps
    some layers in eval mode, e.g. frozen batch norms, passes its own)."""
    progress: bool = True


def run(session: Session, history: list[dict[str, Any]], start_epoch: int) -> dict[str, Any]:
    """Train epochs ``start_epoch``..``session.epochs`` after ``history``; returns the
    best epoch's metrics row."""
    out = session.out
    best_acc = max((r["val_acc"] for r in history), default=-1.0)
    best_path = out / "best.pt"
    for epoch in range(start_epoch, session.epochs + 1):
        train_loss, train_acc, seen, seconds = _fit_epoch(session, epoch)
        val_loss, val_acc = session.evaluate()
        row = {
            "epoch": epoch,
            "lr": session.opt.param_groups[0]["lr"],
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
            session.epochs,
            row["train_loss"],
            row["train_acc"],
            val_loss,
            val_acc,
            seconds,
            row["img_per_s"],
        )
        ckpt = session.snapshot(epoch, val_acc, history)
        if val_acc > best_acc:
            best_acc = val_acc
            checkpoint.save(ckpt, best_path)
        scaler = session.scaler.state_dict() if session.scaler.is_enabled() else None
        resume_state = ResumeState(session.opt.state_dict(), session.sched.state_dict(), scaler)
        checkpoint.save(dataclasses.replace(ckpt, resume=resume_state), out / "last.pt")
        reports.write(history, out)

    best = max(history, key=lambda r: r["val_acc"])
    log.info(
        "best validation accuracy %.2f%% at epoch %d -> %s",
        100 * best["val_acc"],
        best["epoch"],
        best_path,
    )
    return best


def resume(
    session: Session, *, arch: str, classes: tuple[str, ...], into: nn.Module | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Load ``out/last.pt`` into the session: (history so far, first epoch to run).

    ``into`` is the module whose state_dict the checkpoint holds, when it is not the
    session's model itself (a library module inside a wrapper).

    Raises :class:`ExportError` without one, for another model or other classes, or for a
    checkpoint without the optimizer's state (a ``best.pt`` copied in its place).
    """
    last_path = session.out / "last.pt"
    if not last_path.exists():
        raise ExportError(f"--resume: {last_path} does not exist")
    last = checkpoint.load(last_path)
    if last.arch != arch:
        raise ExportError(f"--resume: {last_path} is a {last.arch}, not {arch}")
    if last.classes != classes:
        raise ExportError(
            f"--resume: {last_path} classifies {list(last.classes)}, but the data's classes"
            f" are {list(classes)}"
        )
    if last.resume is None:
        raise ExportError(f"--resume: {last_path} holds no optimizer state to resume")
    (into or session.model).load_state_dict(last.state_dict)
    session.opt.load_state_dict(last.resume.optimizer)
    session.sched.load_state_dict(last.resume.scheduler)
    if last.resume.scaler is not None:
        session.scaler.load_state_dict(last.resume.scaler)
    log.info("resumed from %s after epoch %d", last_path, last.epoch)
    return last.history, last.epoch + 1


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``batches``, in eval mode and float32."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    count = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    return loss_sum.item() / count, correct.item() / count


def _fit_epoch(session: Session, epoch: int) -> tuple[float, float, int, float]:
    """One pass over the training batches: (mean loss, accuracy, images, seconds)."""
    device = session.device
    if session.train_mode is None:
        session.model.train()
    else:
        session.train_mode()
    t0 = time.perf_counter()
    # Running sums stay on the device: reading them every step would stall a GPU.
    seen = 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    bar = tqdm(
        session.batches(epoch),
        total=session.steps_per_epoch,
        desc=f"epoch {epoch}/{session.epochs}",
        unit="batch",
        disable=not session.progress,
        leave=False,
        file=sys.stderr,
    )
    for step, (inputs, targets) in enumerate(bar):
        x = inputs.to(device, non_blocking=True)
        y = targets.to(device, non_blocking=True)
        loss, out = _step(session, x, y)
        seen += len(y)
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if step % 10 == 0 or step == session.steps_per_epoch - 1:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}",
                acc=f"{correct.item() / seen:.3f}",
                img_s=f"{seen / (time.perf_counter() - t0):.0f}",
            )
    seconds = time.perf_counter() - t0
    return loss_sum.item() / seen, correct.item() / seen, seen, seconds


def _step(session: Session, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One optimizer step on the batch ``x``, ``y``: (loss, logits)."""
    amp_dtype = session.amp_dtype
    with torch.autocast(session.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = session.model(x)
        loss = session.loss(out, y, x)
    session.opt.zero_grad(set_to_none=True)
    session.scaler.scale(loss).backward()
    session.scaler.step(session.opt)
    session.scaler.update()
    session.sched.step()
    return loss, out
