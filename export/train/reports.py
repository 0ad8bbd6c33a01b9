"""What a run leaves beside its checkpoints: ``metrics.csv`` and ``curve.png``, rewritten
after every epoch so that they show a run in progress."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

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


def write(history: list[dict[str, Any]], out: Path) -> None:
    """``metrics.csv`` and ``curve.png`` of the epochs so far, in the run directory ``out``."""
    write_metrics(history, out / "metrics.csv")
    plot_curve(history, out / "curve.png")


def write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV row per epoch, with the columns of :data:`METRIC_FIELDS`."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)


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
