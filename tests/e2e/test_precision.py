"""INT8 and FP16 variants of the shipped ResNet-20, served next to it by a real server.

The variants are made by ``export.quantize`` (calibrated on the fixture JPEGs); the server
must describe each one's precision (``/models``, v2 metadata and config), answer with the
same contract, agree with the fp32 model on the fixture images, and warn that an fp16
model on the CPU is not what fp16 is for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2e_server import Server

from export.quantize import quantize_model

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "cifar10-resnet20" / "1" / "model.onnx"
FIXTURES = REPO / "tests" / "fixtures" / "cifar10-val"
IMAGES = sorted(FIXTURES.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def precision_server(
    launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Server:
    repo = tmp_path_factory.mktemp("precision-repo")
    (repo / "r20" / "1").mkdir(parents=True)
    (repo / "r20" / "1" / "model.onnx").symlink_to(SHIPPED)
    common = dict(out=repo, eval_dir=FIXTURES, progress=False)
    quantize_model(
        SHIPPED, precision="int8", name="r20-int8", calibration=FIXTURES, count=50, **common
    )  # type: ignore[arg-type]
    quantize_model(SHIPPED, precision="fp16", name="r20-fp16", **common)  # type: ignore[arg-type]
    return launch(repo)


def _top1(client: httpx.Client, model: str) -> list[str]:
    labels = []
    for i in range(0, len(IMAGES), 10):
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in IMAGES[i : i + 10]]
        response = client.post(f"/predict?model={model}&top_k=1", files=files)
        assert response.status_code == 200, response.text
        labels += [r["predictions"][0]["label"] for r in response.json()["results"]]
    return labels


def test_variants_are_described_with_their_precision(precision_server: Server) -> None:
    with precision_server.client() as client:
        listed = {m["name"]: m["versions"][0] for m in client.get("/models").json()["models"]}
        assert {name: v["precision"] for name, v in listed.items()} == {
            "r20": "fp32",
            "r20-int8": "int8",
            "r20-fp16": "fp16",
        }
        for name, precision in (("r20", "fp32"), ("r20-int8", "int8"), ("r20-fp16", "fp16")):
            metadata = client.get(f"/v2/models/{name}").json()
            assert metadata["parameters"] == {"precision": precision}
            config = client.get(f"/v2/models/{name}/config").json()
            assert config["parameters"]["precision"] == {"string_value": precision}
            assert [o["name"] for o in metadata["outputs"]] == [
                "logits",
                "probabilities",
                "embedding",
            ]
    log = precision_server.log.read_text()
    assert "r20-fp16/1/model.onnx: an fp16 model on the CPU provider runs slower" in log
    assert "r20-int8/1/model.onnx: an fp16" not in log


def test_variants_answer_like_the_fp32_model(precision_server: Server) -> None:
    with precision_server.client() as client:
        fp32 = _top1(client, "r20")
        truth = [p.parent.name for p in IMAGES]
        assert sum(a == b for a, b in zip(fp32, truth, strict=True)) == 48  # the shipped 96 %
        for name, least in (("r20-int8", 47), ("r20-fp16", 50)):
            agree = sum(a == b for a, b in zip(_top1(client, name), fp32, strict=True))
            assert agree >= least, (name, agree)
        embedding = client.post(
            "/embed?model=r20-int8",
            content=IMAGES[0].read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        ).json()
        assert embedding["dim"] == 64 and len(embedding["results"][0]["embedding"]) == 64
