"""Hub folders exported by ``python -m export DIR`` and served by a real server, against the
library itself: timm's model on timm's eval transform, transformers' model on its image
processors, on the 100 shared photos.

Both models are ImageNet-size (224 pixels), with random weights and calibrated batch norms:
a timm ResNet-18-D saved by ``save_for_hf`` with crop_pct 0.95 (so the resize is
floor(224 / 0.95) = 235, bicubic) and a transformers ResNet-18 saved by ``save_pretrained``
beside microsoft/resnet-*'s processor settings (int(224 / 0.875) = 256, bicubic).

timm's transform is the card's, and so is transformers' PIL processor (its crop rounds
the odd margin down, which the card says: ``crop_rounding`` 'floor'), so the served logits
equal the library's within float32 noise on every photo; the default ("fast") processor's
resize adds its own small difference (tests/export/test_preprocess_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from e2e_server import Server
from hub_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    photos,
    rgb,
    timm_folder,
    transformers_folder,
)

from export.__main__ import main

TIMM = "timm-resnet18d"
HF = "hf-resnet18"
HF_LABELS = [f"class {i}" for i in range(10)]
MICROSOFT_PROCESSOR = {
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": 3,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}
# Served against the library, as the largest difference over a photo's logits relative
# to its largest logit. Same preprocessing: float32 noise (measured about 1e-6).
SAME_INPUT_RTOL = 1e-4
# The default processor's resize is not PIL's: measured up to 0.035 in a pixel, 1.4e-3
# in the logits of these random-weight models.
FAST_RTOL = 1e-2
CHUNK = 25  # photos per v2 request


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-served")
    timm_folder(root / TIMM, "resnet18d", seed=18, data_config={"crop_pct": 0.95})
    transformers_folder(
        root / HF, seed=19, labels=HF_LABELS, processor=MICROSOFT_PROCESSOR,
        depths=(2, 2, 2, 2), widths=(64, 128, 256, 512),
    )  # fmt: skip
    for name in (TIMM, HF):
        assert main([str(root / name), "--out", str(root / "models"), "--name", name]) == 0
    return {"models": root / "models", TIMM: root / TIMM, HF: root / HF}


@pytest.fixture(scope="module")
def hub_server(launch: Callable[..., Server], folders: dict[str, Path]) -> Server:
    return launch(folders["models"])


@pytest.fixture(scope="module")
def client(hub_server: Server) -> Iterator[triton.InferenceServerClient]:
    netloc = urlsplit(hub_server.url).netloc
    with triton.InferenceServerClient(netloc, network_timeout=120) as c:
        yield c


def served_logits(client: triton.InferenceServerClient, model: str) -> np.ndarray:
    """Logits for every photo, sent as JPEG files (the v2 protocol's BYTES input)."""
    rows = []
    files = photos()
    for start in range(0, len(files), CHUNK):
        data = [f.read_bytes() for f in files[start : start + CHUNK]]
        image = triton.InferInput("image", [len(data)], "BYTES")
        image.set_data_from_numpy(np.array(data, dtype=np.object_))
        result = client.infer(model, [image], outputs=[triton.InferRequestedOutput("logits")])
        rows.append(result.as_numpy("logits"))
    return np.concatenate(rows)


def relative(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per photo: the largest logit difference over the largest reference logit."""
    return np.abs(got - want).max(1) / np.abs(want).max(1)


def in_batches(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]).numpy()


def test_timm_folder_served_equals_timm(
    client: triton.InferenceServerClient, hub_server: Server, folders: dict[str, Path]
) -> None:
    import timm
    import timm.data

    model = timm.create_model(f"local-dir:{folders[TIMM]}", pretrained=True).eval()
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    want = in_batches(model, torch.stack([transform(rgb(f)) for f in photos()]))
    got = served_logits(client, TIMM)
    assert got.shape == (100, 1000)
    assert relative(got, want).max() <= SAME_INPUT_RTOL
    assert np.array_equal(got.argmax(1), want.argmax(1))

    # /predict names the library's top class with timm's ImageNet names.
    first = photos()[0]
    with hub_server.client() as http:
        response = http.post(f"/predict?model={TIMM}&top_k=1", content=first.read_bytes())
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]["predictions"][0]
    assert top["index"] == int(want[0].argmax())
    assert top["label"] == timm.data.ImageNetInfo().index_to_description(top["index"])


@pytest.fixture(scope="module")
def hf_served(client: triton.InferenceServerClient) -> np.ndarray:
    return served_logits(client, HF)


@pytest.mark.parametrize("backend", ["default", "pil"])
def test_transformers_folder_served_equals_transformers(
    backend: str, hf_served: np.ndarray, folders: dict[str, Path]
) -> None:
    from transformers import AutoImageProcessor, ResNetForImageClassification

    folder = folders[HF]
    kwargs: dict[str, Any] = {"backend": "pil"} if backend == "pil" else {}
    processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    model = ResNetForImageClassification.from_pretrained(folder).eval()
    pixels = np.stack([processor(rgb(f), return_tensors="np")["pixel_values"][0] for f in photos()])
    want = in_batches(lambda x: model(pixel_values=x).logits, torch.from_numpy(pixels))
    got = hf_served
    assert got.shape == (100, len(HF_LABELS))

    rtol = SAME_INPUT_RTOL if backend == "pil" else FAST_RTOL
    assert relative(got, want).max() <= rtol
    assert np.array_equal(got.argmax(1), want.argmax(1))
