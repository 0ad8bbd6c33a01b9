"""Hub folders made the way their libraries make them, and the real photos to compare on.

Shared by tests/export (the exports) and tests/e2e (the same models served over HTTP).
Models have random weights, with batch norms calibrated on noise so that their statistics
are not the identity a fresh model has (an exporter mishandling them would then pass).
Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "photos"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def photos() -> list[Path]:
    """The 100 ImageNet photos of ../shared/photos (read there, never copied)."""
    files = sorted(PHOTOS.glob("*.JPEG"))
    if not files:
        pytest.fail(f"{PHOTOS} holds no photos: the parity tests compare on real photographs")
    return files


def calibrated(model: nn.Module, *, seed: int) -> nn.Module:
    """Batch norms with the statistics of one batch of noise and random affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the running statistics become this batch's exactly
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64, generator=g))
    return model.eval()


def timm_folder(
    folder: Path,
    arch: str,
    *,
    seed: int,
    num_classes: int = 1000,
    safetensors: bool = True,
    model_config: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.models.save_for_hf`` of a calibrated random ``arch``; returns the model."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = calibrated(timm.create_model(arch, num_classes=num_classes), seed=seed)
    save_for_hf(
        model,
        str(folder),
        model_config=model_config,
        data_config=data_config,
        safe_serialization=safetensors,
    )
    return model


def transformers_folder(
    folder: Path,
    *,
    seed: int,
    labels: Sequence[str],
    processor: dict[str, Any],
    depths: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (16, 32, 64, 128),
) -> nn.Module:
    """``ResNetForImageClassification(config).save_pretrained`` beside the image processor's
    ``save_pretrained`` (``ConvNextImageProcessor``, as microsoft/resnet-* have)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=widths[0],
        hidden_sizes=list(widths),
        depths=list(depths),
        layer_type="basic",
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = calibrated(ResNetForImageClassification(config), seed=seed)
    model.save_pretrained(folder)
    ConvNextImageProcessor(**processor).save_pretrained(folder)
    return model


def rgb(path: Path) -> Image.Image:
    """A photo as the libraries' own examples open it (PIL, RGB)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def transformers_pixels(processor: Any, files: Sequence[Path]) -> np.ndarray:
    """[N, 3, H, W] float32 from a transformers image processor, one photo at a time."""
    return np.stack(
        [processor(rgb(f), return_tensors="np")["pixel_values"][0] for f in files]
    ).astype(np.float32)
