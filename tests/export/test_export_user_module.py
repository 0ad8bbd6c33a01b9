"""A user's own ResNet-like module, named package.module:factory and imported from --code-path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_testlib import perturb

from export.api import export_model
from export.builders import load_factory
from export.errors import ExportError
from export.repository import ExportResult, next_version

FACTORY = "tiny_models.nets:tiny_resnet"
LABELS = ("alpha", "beta", "gamma", "delta", "epsilon")


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory, user_models: Path
) -> tuple[ExportResult, torch.nn.Module]:
    """The tiny net with 5 classes, trained-looking weights saved DataParallel-style."""
    model = perturb(load_factory(FACTORY, code_path=user_models)(num_classes=5), seed=7)
    tmp = tmp_path_factory.mktemp("user")
    ckpt = tmp / "tiny.th"
    torch.save(
        {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt
    )
    labels = tmp / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n\n")
    result = export_model(
        FACTORY,
        code_path=user_models,
        checkpoint_path=ckpt,
        labels=labels,
        input_size=32,
        resize=36,
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
        interpolation="bicubic",
        out=tmp / "models",
        name="tiny",
    )
    return result, model


def test_embedding_is_the_input_of_the_final_linear(
    tiny: tuple[ExportResult, torch.nn.Module],
) -> None:
    result, model = tiny
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, emb = session.run(None, {"input": x.numpy()})
    assert logits.shape == (4, 5)
    assert emb.shape == (4, 40)  # `head` is Linear(40, 5): its input is 40 wide
    with torch.no_grad():
        pooled = torch.flatten(model.pool(model.blocks(model.stem(x))), 1)  # type: ignore[operator]
        ref_emb = torch.relu(model.neck(pooled)).numpy()  # type: ignore[operator]
        ref_logits = model(x).numpy()
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_card_records_the_flags(tiny: tuple[ExportResult, torch.nn.Module]) -> None:
    card = tiny[0].card
    assert card.labels == LABELS
    pre = card.preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (36, 32, "bicubic")
    assert (pre.mean, pre.std) == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert card.provenance.source == "custom"
    assert card.provenance.arch == FACTORY
    assert card.provenance.weights == "tiny.th"
    assert card.provenance.trained is True


def test_versions_count_up(tmp_path: Path, user_models: Path) -> None:
    common = dict(code_path=user_models, input_size=16, out=tmp_path, name="tiny")
    (tmp_path / "tiny" / "7").mkdir(parents=True)  # a version folder made by hand
    first = export_model(FACTORY, **common)  # type: ignore[arg-type]
    assert first.version == 8
    assert first.path == tmp_path / "tiny" / "8" / "model.onnx"
    assert next_version(tmp_path / "tiny") == 9
    with pytest.raises(ExportError, match=r"tiny/8/model.onnx exists; pick another --version"):
        export_model(FACTORY, version=8, **common)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["7", "8"]


def test_verification_failure_writes_nothing(tmp_path: Path, user_models: Path) -> None:
    # `drifting` scales its logits by a call counter: the traced graph froze the count, so
    # PyTorch and ONNX Runtime really disagree and the export must refuse to write the file.
    with pytest.raises(ExportError, match=r"verification failed: .* tolerance 1e-04"):
        export_model("tiny_models.nets:drifting", code_path=user_models, input_size=16,
                     out=tmp_path, name="drift")  # fmt: skip
    assert not (tmp_path / "drift").exists()


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("tiny_models.missing:net", "cannot import 'tiny_models.missing'"),
        ("tiny_models.nets:nope", "tiny_models.nets has no callable 'nope'"),
        ("tiny_models.nets:not_a_model", "returned a str, not a torch.nn.Module"),
        ("tiny_models.nets:", "a user model is named package.module:function"),
    ],
)
def test_bad_factories_fail_clearly(
    arch: str, message: str, tmp_path: Path, user_models: Path
) -> None:
    with pytest.raises(ExportError, match=message):
        export_model(arch, code_path=user_models, out=tmp_path, name="m")


def test_label_count_must_match(tmp_path: Path, user_models: Path) -> None:
    # `drifting` takes no num_classes argument, so its 3 outputs cannot follow the labels.
    with pytest.raises(ExportError, match="the model has 3 outputs but 5 labels were given"):
        export_model("tiny_models.nets:drifting", code_path=user_models, labels=list("abcde"),
                     input_size=16, out=tmp_path, name="m")  # fmt: skip
