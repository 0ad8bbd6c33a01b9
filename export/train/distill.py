"""Knowledge distillation (Hinton et al. 2015): trained teachers' softened predictions as
targets for the model being trained, beside its labels."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export import cifar_resnet
from export.train import checkpoint

log = logging.getLogger("export.train")


class Teachers(nn.Module):
    """Trained models whose averaged, softened predictions the student learns to match.

    Each is a checkpoint of ``python -m export.train``. A teacher must come from the same
    split as the student (seed and images held out per class), or it would have trained on
    the student's validation images and the validation accuracy would flatter the student.
    """

    def __init__(
        self, paths: list[Path], *, classes: tuple[str, ...], split: checkpoint.Split
    ) -> None:
        super().__init__()
        self.models = nn.ModuleList()
        for path in paths:
            ckpt = checkpoint.load(path)
            if ckpt.classes != classes:
                raise ValueError(
                    f"--teacher: {path} classifies {list(ckpt.classes)}, not {list(classes)}"
                )
            if ckpt.split != split:
                raise ValueError(
                    f"--teacher: {path} was trained on another split ({asdict(ckpt.split)}, this"
                    f" run {asdict(split)}); it would have seen this run's validation images"
                )
            model = cifar_resnet.build(ckpt.arch, num_classes=len(classes))
            model.load_state_dict(ckpt.state_dict)
            self.models.append(model.eval().requires_grad_(False))
            log.info(
                "teacher %s: %s, epoch %d, val_acc %.4f", path, ckpt.arch, ckpt.epoch, ckpt.val_acc
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
