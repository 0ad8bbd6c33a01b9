"""Fixtures shared by the service unit tests and the end-to-end tests.

Models are made once per session by the real exporter (``export.api.export_model``, what
``python -m export`` runs); images are real JPEGs from the CIFAR-10 archive plus larger
JPEG/PNG files drawn with Pillow.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw

from service.metadata import Preprocessing

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared/datasets/cifar10-train.tar.gz"
CIFAR_MODEL = "cifar10-resnet20"


@pytest.fixture(scope="session")
def cifar_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained CIFAR ResNet-20 (32x32 input, 10 classes), exported with its model card."""
    from export.api import export_model  # torch: imported only by tests that need a model

    out = tmp_path_factory.mktemp("exported")
    result = export_model("cifar-resnet20", out=out, name=CIFAR_MODEL, version=1)
    return Path(result.path)


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An RGB picture with smooth gradients, shapes and sensor-like noise (JPEG-realistic)."""
    rng = np.random.default_rng(seed)
    small_w, small_h = max(2, width // 8), max(2, height // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.stack(
        [255 * x / small_w, 255 * y / small_h, 127 + 100 * np.sin((x + 2 * y) / (small_w / 7))],
        -1,
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        x1 = x0 + int(rng.integers(1, width // 3 + 2))
        y1 = y0 + int(rng.integers(1, height // 3 + 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noise = Image.effect_noise((width, height), 6).convert("RGB")  # gaussian around 128
    return ImageChops.add(image, noise, scale=1.0, offset=-128)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo_like() -> Callable[[int, int, int], Image.Image]:
    """``photo_like(width, height, seed)``: a JPEG-realistic RGB picture."""
    return _photo_like


@pytest.fixture(scope="session")
def test_images() -> dict[str, bytes]:
    """Name -> file bytes: four real CIFAR-10 JPEGs (32x32) and generated JPEG/PNG files."""
    images: dict[str, bytes] = {}
    with tarfile.open(CIFAR_TAR) as tar:  # ../shared is present in CI and on this machine
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and member.name.endswith(".jpg") and len(parts) >= 2:
                key = f"cifar_{parts[-2]}.jpg"
                data = tar.extractfile(member)
                if key not in images and data is not None:
                    images[key] = data.read()
                if len(images) == 4:
                    break
    images["photo_500x375.jpg"] = _encode(_photo_like(500, 375, 1), "JPEG", quality=90)
    images["small_48x40.jpg"] = _encode(_photo_like(48, 40, 2), "JPEG", quality=95)
    images["portrait_90x120.png"] = _encode(_photo_like(90, 120, 3), "PNG")
    images["gray_64x48.png"] = _encode(_photo_like(64, 48, 4).convert("L"), "PNG")
    return images


def _torchvision_eval(data: bytes, spec: Preprocessing) -> np.ndarray:
    import torch
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(spec.resize, interpolation=T.InterpolationMode(spec.interpolation)),
            T.CenterCrop(spec.crop),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    with torch.no_grad():
        return transform(Image.open(io.BytesIO(data)).convert("RGB")).numpy()


@pytest.fixture(scope="session")
def torchvision_eval() -> Callable[[bytes, Preprocessing], np.ndarray]:
    """``torchvision_eval(image_bytes, spec)``: the reference the service must equal.

    What a model is trained and verified with: PIL decode + torchvision's eval transform.
    """
    return _torchvision_eval
