"""export.evaluate: exported models scored on the held-out split as served, and averaged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_testlib import train_argv

from export import data, evaluate
from export.labels import CIFAR10_CLASSES
from export.train import cli
from service.metadata import INPUT_NAME, LOGITS_NAME, ModelCard
from service.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_scores_each_model_and_their_ensemble(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given two models, one line each as if evaluated alone, and one for their averaged
    probabilities, which matches ONNX Runtime run on the held-out images directly."""
    run, models = tmp_path / "run", tmp_path / "models"
    assert cli.main(train_argv(data_source, run, "--epochs", "1")) == 0
    labels = tmp_path / "reversed.txt"
    labels.write_text("\n".join(reversed(CIFAR10_CLASSES)) + "\n")
    for name, extra in [
        ("plain", []),
        ("flip", ["--tta", "flip"]),
        ("other", ["--labels", str(labels)]),
    ]:
        subprocess.run(
            [sys.executable, "-m", "export", "cifar-resnet20", "--checkpoint", str(run / "best.pt"),
             "--out", str(models), "--name", name, "--version", "1", *extra],
            check=True, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
    plain, flip, other = (models / n / "1" / "model.onnx" for n in ("plain", "flip", "other"))
    split = ["--data", data_source, "--val-per-class", "2"]

    capsys.readouterr()
    assert evaluate.main([str(plain), *split]) == 0
    assert evaluate.main([str(flip), *split]) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
    assert evaluate.main([str(plain), str(flip), *split]) == 0
    together = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
    assert together[:2] == alone

    files = data.read_files(data_source)
    classes = sorted({c for c, _ in files})
    targets = torch.tensor([classes.index(c) for c, _ in files])
    _, val = data.stratified_split(targets, 2, seed=0)
    probs = 0
    for model in (plain, flip):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        pre = Preprocessor(card.preprocessing, max_pixels=1 << 20)
        batch = np.stack([pre(files[i][1]) for i in val.tolist()])
        (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: batch})
        probs = probs + torch.from_numpy(logits).double().softmax(1)
    correct = int((probs.argmax(1) == targets[val]).sum())
    assert together[2].startswith(f"ensemble of the 2 (probabilities averaged): {correct}/20 ")

    # A model with other classes (here, in another order) is refused, not averaged in.
    assert evaluate.main([str(plain), str(other), *split]) == 1
    assert "are not" in capsys.readouterr().err
