"""A new head made by ``python -m export.transfer`` while a real server runs, then loaded by it.

The server starts on a repository holding only the shipped ResNet-20 (model control
``explicit``); the new model is written into that repository by the command, loaded with
the v2 repository API without a restart, and must answer ``/predict`` with the new labels
and the softmax of the head the file carries, and ``/embed`` with the source's features.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from e2e_server import Server
from onnx import numpy_helper
from transfer_testlib import FIXTURES, SHIPPED, grouped_folder

from export.transfer import main

IMAGES = [FIXTURES / "airplane" / "0038.jpg", FIXTURES / "cat" / "0000.jpg"]
IMAGES += [FIXTURES / "truck" / "0003.jpg"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transfer-repo")
    (root / "r20" / "1").mkdir(parents=True)
    (root / "r20" / "1" / "model.onnx").symlink_to(SHIPPED)
    return root


@pytest.fixture(scope="module")
def running(launch: Callable[..., Server], repo: Path) -> Server:
    return launch(repo, "--model-control", "explicit")


def _results(server: Server, path: str) -> list[dict[str, Any]]:
    """The ``results`` of a multipart POST of :data:`IMAGES`, checked to be a 200."""
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in IMAGES]
    with server.client() as client:
        response = client.post(path, files=files)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_a_new_head_is_written_loaded_and_served_without_a_restart(
    running: Server, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = grouped_folder(tmp_path / "groups")
    argv = [str(SHIPPED), "--data", str(data), "--out", str(repo), "--name", "r20-groups"]
    assert main([*argv, "--no-progress"]) == 0
    assert "validation accuracy: 100.00% (9/9)" in capsys.readouterr().out

    with running.client() as client:
        assert client.post("/v2/repository/models/r20-groups/load").status_code == 200
        described = client.get("/models/r20-groups").json()
        source_labels = client.get("/models/r20").json()["labels"]
    assert described["labels"] == ["flying", "pet", "road"]
    assert described["versions"][0]["state"] == "ready"
    assert described["versions"][0]["num_classes"] == 3
    assert source_labels[:2] == ["airplane", "automobile"]  # the source untouched

    with running.client() as client:
        one = client.post(
            "/predict?model=r20-groups&top_k=1", content=IMAGES[0].read_bytes(),
            headers={"Content-Type": "image/jpeg"},
        ).json()  # fmt: skip
    assert (one["model"], one["version"]) == ("r20-groups", 1)
    assert [p["label"] for p in one["results"][0]["predictions"]] == ["flying"]
    results = _results(running, "/predict?model=r20-groups")  # default top_k: all 3 classes
    assert all(len(r["predictions"]) == 3 for r in results)
    assert [r["predictions"][0]["label"] for r in results] == ["flying", "pet", "road"]

    # The scores are the softmax of the file's own head on the served embedding, which is
    # the source model's.
    emb = np.array([r["embedding"] for r in _results(running, "/embed?model=r20-groups")])
    source = np.array([r["embedding"] for r in _results(running, "/embed?model=r20")])
    np.testing.assert_array_equal(emb, source)
    graph = onnx.load(str(repo / "r20-groups" / "1" / "model.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    logits = emb @ weights["transfer_head.weight"].T + weights["transfer_head.bias"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for row, want in zip(results, expected, strict=True):
        scores = {p["label"]: p["score"] for p in row["predictions"]}
        got = [scores[label] for label in ("flying", "pet", "road")]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
