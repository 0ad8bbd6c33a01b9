"""ONNX files another tool wrote, adopted by ``python -m export FILE.onnx`` and served.

Two ResNet-18s exported by ``torch.onnx.export`` at a fixed batch of 1 under their own
tensor names: one the adoption makes batch-dynamic, one whose graph flattens the whole
batch and so is served one image at a time (its config.json). Through a real server,
/predict must give the softmax of the original file's logits and /embed the PyTorch
model's pooled features, both on torchvision's preprocessing of the same images.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from e2e_server import Server
from torch import nn

from export.__main__ import main
from service.engine import softmax
from service.metadata import Preprocessing

SIZE = 64
LABELS = ("tench", "goldfish", "shark", "ray", "hen", "ostrich", "finch")
# Small enough that the service decodes them at full size (no JPEG draft), as torchvision does.
IMAGES = ("small_48x40.jpg", "portrait_90x120.png", "gray_64x48.png")
SPEC = Preprocessing(resize=73, crop=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _models() -> dict[str, tuple[nn.Module, nn.Linear]]:
    """Name -> (the exported module, its final layer)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=len(LABELS)).eval()
    other = torchvision.models.resnet18(num_classes=len(LABELS)).eval()
    # Flattening the whole batch (start_dim 0) bakes batch 1 into the graph.
    one = nn.Sequential(*list(other.children())[:-1], nn.Flatten(0), nn.Unflatten(0, (1, 512)))
    return {"resnet18": (net, net.fc), "batch-one": (nn.Sequential(one, other.fc), other.fc)}


def _features(model: nn.Module, fc: nn.Linear, batch: np.ndarray) -> np.ndarray:
    """The input of ``fc``, a row at a time (batch-one's PyTorch model needs that too)."""
    features: list[torch.Tensor] = []
    hook = fc.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    with torch.no_grad():
        for row in batch:
            model(torch.from_numpy(row[None]))
    hook.remove()
    return torch.cat(features).numpy()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The model repository the adoptions wrote, and each original file."""
    root = tmp_path_factory.mktemp("adopt")
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    originals = {}
    for name, (model, _) in _models().items():
        originals[name] = root / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (torch.randn(1, 3, SIZE, SIZE),), str(originals[name]),
                input_names=["images"], output_names=["scores"], dynamo=False,
            )  # fmt: skip
        code = main([
            str(originals[name]), "--labels", str(labels), "--resize", str(SPEC.resize),
            "--mean", *map(str, SPEC.mean), "--std", *map(str, SPEC.std),
            "--out", str(root / "models"), "--name", name,
        ])  # fmt: skip
        assert code == 0
    config = json.loads((root / "models" / "batch-one" / "config.json").read_text())
    assert config == {"max_batch_size": 1}
    assert not (root / "models" / "resnet18" / "config.json").exists()
    return root / "models", originals


def test_adopted_files_answer_predict_and_embed(
    repository: tuple[Path, dict[str, Path]],
    launch: Callable[..., Server],
    test_images: dict[str, bytes],
    torchvision_eval: Callable[[bytes, Preprocessing], np.ndarray],
) -> None:
    models, originals = repository
    batch = np.stack([torchvision_eval(test_images[n], SPEC) for n in IMAGES])
    files = [("file", (n, test_images[n])) for n in IMAGES]
    server = launch(models)
    with server.client() as client:
        for name, (model, fc) in _models().items():
            session = ort.InferenceSession(str(originals[name]), providers=["CPUExecutionProvider"])
            logits = np.concatenate([session.run(None, {"images": row[None]})[0] for row in batch])
            predicted = client.post(f"/predict?model={name}&top_k={len(LABELS)}", files=files)
            assert predicted.status_code == 200, predicted.text
            for result, probs in zip(predicted.json()["results"], softmax(logits), strict=True):
                for p in result["predictions"]:
                    assert p["label"] == LABELS[p["index"]]
                    assert p["score"] == pytest.approx(float(probs[p["index"]]), abs=1e-5)
            embedded = client.post(f"/embed?model={name}", files=files)
            assert embedded.status_code == 200, embedded.text
            body = embedded.json()
            assert (body["model"], body["version"], body["dim"]) == (name, 1, 512)
            got = np.array([r["embedding"] for r in body["results"]], dtype=np.float32)
            want = _features(model, fc, batch)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
