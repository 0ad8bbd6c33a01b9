"""--tta flip: the graph answers the mean of the plain model on an image and on its mirror."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.__main__ import parse_args
from export.api import export_model
from export.repository import ExportResult
from service.metadata import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME


@pytest.fixture(scope="module")
def flip_export(
    trained_r20: tuple[nn.Module, Path], cifar_jpegs: Path, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    _, ckpt = trained_r20
    return export_model(
        "cifar-resnet20",
        checkpoint_path=ckpt,
        out=tmp_path_factory.mktemp("models"),
        name="r20-flip",
        tta="flip",
        verify_images=cifar_jpegs,
    )


def _run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: x})
    return logits, embedding


def test_flip_is_the_mean_over_the_image_and_its_mirror(
    flip_export: ExportResult, trained_r20_export: ExportResult
) -> None:
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    mirrored = np.ascontiguousarray(x[..., ::-1])
    plain_logits, plain_emb = _run(trained_r20_export.path, np.concatenate([x, mirrored]))
    logits, embedding = _run(flip_export.path, x)
    np.testing.assert_allclose(logits, (plain_logits[:5] + plain_logits[5:]) / 2, atol=1e-5)
    np.testing.assert_allclose(embedding, (plain_emb[:5] + plain_emb[5:]) / 2, atol=1e-5)
    # The average differs from the plain answer: the mirror really went through the model.
    assert np.abs(logits - plain_logits[:5]).max() > 1e-3
    # And a mirrored image gets the same answer as the original, at every batch size.
    for n in (1, 5):
        mirror_logits, _ = _run(flip_export.path, mirrored[:n])
        np.testing.assert_allclose(mirror_logits, logits[:n], atol=1e-5)


def test_card_says_which_graph_it_is(
    flip_export: ExportResult, trained_r20_export: ExportResult
) -> None:
    assert flip_export.card.provenance.test_time_augmentation == "flip"
    assert trained_r20_export.card.provenance.test_time_augmentation == "none"
    v = flip_export.card.verification
    assert v is not None and v.top1_agreement == 1.0 and v.max_rel_diff_logits < 1e-4


def test_cli_takes_tta_and_defaults_to_none() -> None:
    base = ["cifar-resnet20", "--out", "m", "--name", "x"]
    assert parse_args(base).tta == "none"
    assert parse_args([*base, "--tta", "flip"]).tta == "flip"
    with pytest.raises(SystemExit):
        parse_args([*base, "--tta", "crops"])
