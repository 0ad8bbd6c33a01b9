"""Train a CIFAR ResNet with the recipe of He et al. (2015), section 4.2.

The paper: 45k/5k train/validation split, 4-pixel padding + random 32x32 crop +
horizontal flip, per-channel normalization, He initialization, SGD with momentum 0.9,
weight decay 1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k iterations
and stopped at 64k (about 182 epochs). ``--schedule step`` reproduces that, scaled to
``--epochs``. The default ``onecycle`` (linear warm-up, cosine decay; Smith & Topin 2017)
gets most of the way in a fraction of the epochs, which is what two CPU cores can afford;
``--init`` runs another cycle from an earlier run's weights (a warm restart, as in SGDR,
Loshchilov & Hutter 2017) when there is time for more. ``--teacher`` distils one or
more trained models into the one being trained (Hinton et al. 2015): a deeper CIFAR
ResNet, or an ensemble of earlier runs, into the small one you serve.

Example::

    python -m export.train --arch cifar-resnet20 \\
        --data ../shared/datasets/cifar10-train.tar.gz --epochs 40 --out runs/r20
    python -m export.train --arch cifar-resnet20 --init runs/r20/best.pt --lr 0.1 \\
        --data ../shared/datasets/cifar10-train.tar.gz --epochs 40 --out runs/r20-more

It runs on a CUDA GPU when there is one (``--device auto``, the default) and on the CPU
otherwise. ``--amp bf16`` trains in bfloat16 mixed precision (autocast; weights and the
optimizer stay float32): on Ampere and later GPUs, and on CPUs with AVX-512 BF16 or AMX,
which run it faster. ``--amp fp16`` is for older GPUs, with dynamic loss scaling.

Writes ``last.pt`` (every epoch, for ``--resume``), ``best.pt`` (best validation
accuracy), ``metrics.csv`` and ``curve.png`` to ``--out``. Both checkpoints are plain
tensors and primitives, loadable with ``torch.load(..., weights_only=True)`` and accepted
directly by ``python -m export``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from export import cifar_resnet, data

log = logging.getLogger("export.train")

CHECKPOINT_FORMAT = "resnet-serve-checkpoint/1"
METRIC_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "img_per_s",
)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.train",
        description=__doc__,
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


class Augment:
    """The paper's augmentation on a whole uint8 NHWC batch: pad 4, random crop, flip.

    ``cutout`` > 0 adds Cutout (DeVries & Taylor 2017), which is not in the paper: a
    ``cutout`` x ``cutout`` square at a random centre (clipped at the border) is set to
    the mean colour, 0 after normalization. It draws after the flip, so with it off the
    random stream, and so every earlier run, is unchanged.
    """

    def __init__(self, mean: list[float], std: list[float], pad: int = 4, cutout: int = 0) -> None:
        self.pad = pad
        self.cutout = cutout
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 NHWC -> normalized float32 NCHW, laid out channels_last."""
        x = images.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __call__(self, images: Tensor, g: torch.Generator) -> Tensor:
        n, h, w, _ = images.shape
        padded = F.pad(images, (0, 0, self.pad, self.pad, self.pad, self.pad))
        oy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        ox = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n, h, 1]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n, 1, w]
        crops = padded[torch.arange(n)[:, None, None], rows, cols]  # [n, h, w, 3]
        flip = torch.rand(n, generator=g) < 0.5
        crops = torch.where(flip[:, None, None, None], crops.flip(2), crops)
        x = self.normalize(crops)
        if self.cutout:
            cy = torch.randint(0, h, (n,), generator=g)
            cx = torch.randint(0, w, (n,), generator=g)
            dy = torch.arange(h) - (cy[:, None] - self.cutout // 2)  # [n, h]
            dx = torch.arange(w) - (cx[:, None] - self.cutout // 2)  # [n, w]
            rows = (dy >= 0) & (dy < self.cutout)
            cols = (dx >= 0) & (dx < self.cutout)
            hole = rows[:, None, :, None] & cols[:, None, None, :]  # [n, 1, h, w]
            x.masked_fill_(hole, 0.0)
        return x


class Teachers(nn.Module):
    """Trained models whose averaged, softened predictions the student learns to match.

    Each is a checkpoint of this command. A teacher must come from the same split as the
    student (seed and images held out per class), or it would have trained on the
    student's validation images and the validation accuracy would flatter the student.
    """

    def __init__(self, paths: list[Path], args: argparse.Namespace, classes: list[str]) -> None:
        super().__init__()
        self.models = nn.ModuleList()
        for path in paths:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["classes"] != classes:
                raise ValueError(f"--teacher: {path} classifies {state['classes']}, not {classes}")
            split = {k: state["args"].get(k) for k in ("seed", "val_per_class", "limit")}
            want = {k: getattr(args, k) for k in split}
            if split != want:
                raise ValueError(
                    f"--teacher: {path} was trained on another split ({split}, this run"
                    f" {want}); it would have seen this run's validation images"
                )
            model = cifar_resnet.build(state["arch"], num_classes=len(classes))
            model.load_state_dict(state["model"])
            self.models.append(model.eval().requires_grad_(False))
            log.info(
                "teacher %s: %s, epoch %d, val_acc %.4f",
                path,
                state["arch"],
                state["epoch"],
                state["val_acc"],
            )

    @torch.no_grad()
    def forward(self, x: Tensor, temperature: float) -> Tensor:
        """The ensemble's class probabilities at ``temperature``, averaged over teachers."""
        probs = [F.softmax(m(x).float() / temperature, dim=1) for m in self.models]
        return torch.stack(probs).mean(0)


def distillation_loss(
    logits: Tensor, targets: Tensor, soft: Tensor, weight: float, temperature: float
) -> Tensor:
    """Hinton et al. (2015): cross-entropy on the labels mixed with the KL divergence
    from the teacher's softened probabilities, scaled by T^2 so its gradients keep
    their size as the temperature changes."""
    hard = F.cross_entropy(logits, targets)
    log_student = F.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(log_student, soft, reduction="batchmean") * temperature**2
    return (1 - weight) * hard + weight * kl


def make_scheduler(
    opt: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
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


def plot_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(epochs, [100 * r["train_acc"] for r in rows], label="train (augmented)")
    ax2.plot(epochs, [100 * r["val_acc"] for r in rows], label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    best = max(rows, key=lambda r: r["val_acc"])
    ax2.annotate(
        f"best {100 * best['val_acc']:.2f}%",
        (best["epoch"], 100 * best["val_acc"]),
        textcoords="offset points",
        xytext=(-60, -20),
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole training; returns the best checkpoint's summary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = AMP_DTYPES[args.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on a CPU use --amp bf16")
    if args.teacher and not (0.0 <= args.distill_weight <= 1.0 and args.distill_temperature > 0):
        raise ValueError("--distill-weight must be in [0, 1], --distill-temperature > 0")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    ds = data.load(args.data, size=32, limit=args.limit, progress=not args.no_progress)
    train_idx, val_idx = data.stratified_split(ds.targets, args.val_per_class, seed=args.seed)
    train_ds, val_ds = ds.subset(train_idx), ds.subset(val_idx)
    mean, std = data.channel_stats(train_ds.images)
    log.info(
        "data: %d train / %d validation images, %d classes; mean %s std %s",
        len(train_ds),
        len(val_ds),
        len(ds.classes),
        [round(m, 4) for m in mean],
        [round(s, 4) for s in std],
    )

    torch.manual_seed(args.seed)
    model = cifar_resnet.build(args.arch, num_classes=len(ds.classes))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    sched = make_scheduler(opt, args, steps_per_epoch)
    # Loss scaling keeps float16 gradients from underflowing; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    aug = Augment(mean, std, cutout=args.cutout)
    teachers = None
    if args.teacher:
        teachers = Teachers(args.teacher, args, list(ds.classes))
        teachers = teachers.to(device).to(memory_format=torch.channels_last)
    log.info("device %s, mixed precision %s", device, args.amp)

    history: list[dict[str, Any]] = []
    start_epoch, best_acc = 1, -1.0
    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    if args.init and not args.resume:
        state = torch.load(args.init, map_location=device, weights_only=True)
        if state["arch"] != args.arch or state["classes"] != list(ds.classes):
            raise ValueError(
                f"--init: {args.init} is a {state['arch']} over {state['classes']},"
                f" not a {args.arch} over {list(ds.classes)}"
            )
        model.load_state_dict(state["model"])
        log.info(
            "weights from %s (epoch %d, val_acc %.4f)", args.init, state["epoch"], state["val_acc"]
        )
    if args.resume:
        if not last_path.exists():
            raise FileNotFoundError(f"--resume: {last_path} does not exist")
        state = torch.load(last_path, map_location=device, weights_only=True)
        if state["arch"] != args.arch:
            raise ValueError(f"--resume: {last_path} is a {state['arch']}, not {args.arch}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        best_acc = max((r["val_acc"] for r in history), default=-1.0)
        log.info("resumed from %s after epoch %d", last_path, state["epoch"])

    common = {
        "format": CHECKPOINT_FORMAT,
        "arch": args.arch,
        "num_classes": len(ds.classes),
        "classes": list(ds.classes),
        "mean": mean,
        "std": std,
        "input_size": 32,
    }
    for epoch in range(start_epoch, args.epochs + 1):
        # A generator per epoch: the order and augmentation of epoch e do not depend on
        # whether the run was interrupted before it, so --resume repeats a run exactly.
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(train_ds), generator=g)
        model.train()
        t0 = time.perf_counter()
        # Running sums stay on the device: reading them every step would stall a GPU.
        seen = 0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{args.epochs}",
            unit="batch",
            disable=args.no_progress,
            leave=False,
            file=sys.stderr,
        )
        for step in bar:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = aug(train_ds.images[idx], g).to(device, non_blocking=True)
            y = train_ds.targets[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x)
                soft = None if teachers is None else teachers(x, args.distill_temperature)
            if soft is None:
                loss = F.cross_entropy(out.float(), y)
            else:
                loss = distillation_loss(
                    out.float(), y, soft, args.distill_weight, args.distill_temperature
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            if step % 10 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    img_s=f"{seen / (time.perf_counter() - t0):.0f}",
                )
        seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate(model, val_ds, aug)
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": round(loss_sum.item() / seen, 5),
            "train_acc": round(correct.item() / seen, 5),
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
        ckpt = {
            **common,
            "epoch": epoch,
            "val_acc": val_acc,
            "model": _to_cpu(model.state_dict()),
            "history": history,
            "args": _primitive_args(args),
        }
        if val_acc > best_acc:
            best_acc = val_acc
            _save(ckpt, best_path)
        resume = {"optimizer": _to_cpu(opt.state_dict()), "scheduler": sched.state_dict()}
        if scaler.is_enabled():
            resume["scaler"] = scaler.state_dict()
        _save({**ckpt, **resume}, last_path)
        write_metrics(history, args.out / "metrics.csv")
        plot_curve(history, args.out / "curve.png")

    best = max(history, key=lambda r: r["val_acc"])
    log.info(
        "best validation accuracy %.2f%% at epoch %d -> %s",
        100 * best["val_acc"],
        best["epoch"],
        best_path,
    )
    return best


def _to_cpu(obj: Any) -> Any:
    """A state dict with every tensor on the CPU: checkpoints load on any machine."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _primitive_args(args: argparse.Namespace) -> dict[str, Any]:
    def primitive(v: Any) -> Any:
        if isinstance(v, list):
            return [primitive(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    return {k: primitive(v) for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
