"""Checkpoint formats round-trip; wrong or unsafe checkpoints fail with a message that helps."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_testlib import (
    TRAINED_CLASSES,
    TRAINED_MEAN,
    TRAINED_STD,
    trained_like,
)
from torch import nn

from export import checkpoint, cifar_resnet
from export.api import export_model
from export.errors import ExportError
from export.repository import ExportResult

Save = Callable[[object, str], Path]


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return trained_like("cifar-resnet20-b", seed=3)


def _layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    prefixed = {f"module.{k}": v for k, v in state.items()}
    return {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 90, "best_acc1": 91.3},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": state, "epoch": 12},
        "module-prefix": prefixed,
        "wrapped-module-prefix": {"state_dict": prefixed, "arch": "cifar-resnet20-b"},
        "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
    }


@pytest.mark.parametrize(
    "layout",
    [
        "plain",
        "state_dict",
        "model",
        "model_state_dict",
        "module-prefix",
        "wrapped-module-prefix",
        "compiled",
    ],
)
def test_layout_round_trips(layout: str, source: nn.Module, save_pt: Save) -> None:
    path = save_pt(_layouts(source.state_dict())[layout], f"{layout}.pth")
    ckpt = checkpoint.load(path)
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    fresh = cifar_resnet.build("cifar-resnet20-b")
    checkpoint.apply(fresh, ckpt.state_dict, what="cifar-resnet20-b")
    loaded, expected = fresh.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), source(x))


def test_training_checkpoint_metadata_is_read(trained_r20: tuple[nn.Module, Path]) -> None:
    _, path = trained_r20
    ckpt = checkpoint.load(path)
    assert ckpt.arch == "cifar-resnet20"
    assert ckpt.classes == TRAINED_CLASSES
    assert ckpt.mean == TRAINED_MEAN and ckpt.std == TRAINED_STD
    assert ckpt.input_size == 32


def test_export_takes_labels_and_normalization_from_training_checkpoint(
    trained_r20_export: ExportResult, trained_r20: tuple[nn.Module, Path]
) -> None:
    card = trained_r20_export.card
    assert card.labels == TRAINED_CLASSES
    assert card.preprocessing.mean == TRAINED_MEAN
    assert card.preprocessing.std == TRAINED_STD
    assert (card.preprocessing.resize, card.preprocessing.crop) == (32, 32)
    assert card.provenance.trained is True
    assert card.provenance.weights == "best.pt"
    assert card.provenance.checkpoint_sha256 == checkpoint.sha256_of(trained_r20[1])
    assert trained_r20_export.path.parts[-3:] == ("cifar10-resnet20", "1", "model.onnx")


def test_wrong_depth_lists_missing_keys(source: nn.Module, save_pt: Save) -> None:
    path = save_pt(source.state_dict(), "r20b.pt")
    fresh = cifar_resnet.build("cifar-resnet32-b")
    with pytest.raises(ExportError) as info:
        checkpoint.apply(fresh, checkpoint.load(path).state_dict, what="cifar-resnet32-b")
    message = str(info.value)
    # 72 model keys are absent, but torch fills the 12 num_batches_tracked of blocks the
    # checkpoint's _metadata does not version, as load_state_dict(strict=True) does.
    assert message.startswith("checkpoint does not match cifar-resnet32-b: 60 missing keys (")
    assert "layer1.3.conv1.weight" in message and "num_batches_tracked" not in message
    assert "... and 52 more" in message
    assert "unexpected" not in message


def test_option_b_checkpoint_into_option_a_lists_unexpected_keys(
    source: nn.Module, save_pt: Save
) -> None:
    path = save_pt({"model": source.state_dict()}, "r20b.pt")
    fresh = cifar_resnet.build("cifar-resnet20")
    with pytest.raises(ExportError, match=r"unexpected keys \(layer2\.0\.shortcut\.0\.weight, "):
        checkpoint.apply(fresh, checkpoint.load(path).state_dict, what="cifar-resnet20")


def test_wrong_class_count_names_the_shapes(save_pt: Save, tmp_path: Path) -> None:
    model = trained_like("cifar-resnet20", seed=5, num_classes=100)
    path = save_pt(model.state_dict(), "c100.pt")
    with pytest.raises(ExportError) as info:
        export_model("cifar-resnet20", checkpoint_path=path, out=tmp_path, name="m")
    assert str(info.value) == (
        "checkpoint does not match cifar-resnet20: 2 shapes differ "
        "(fc.weight: checkpoint [100, 64] vs model [10, 64], "
        "fc.bias: checkpoint [100] vs model [10])"
    )
    assert not (tmp_path / "m").exists()


def test_training_checkpoint_of_another_arch_is_refused(
    trained_r20: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="was trained as cifar-resnet20, not cifar-resnet56"):
        export_model("cifar-resnet56", checkpoint_path=trained_r20[1], out=tmp_path, name="m")


def test_pickled_code_is_never_loaded(save_pt: Save) -> None:
    # A whole pickled module needs arbitrary unpickling; weights_only=True refuses it.
    path = save_pt(nn.Linear(2, 2), "whole-model.pt")
    refused = r"weights_only=True: it pickles torch\.nn\.modules\.linear\.Linear"
    with pytest.raises(ExportError, match=refused):
        checkpoint.load(path)


def test_no_state_dict_inside_names_the_top_level_keys(save_pt: Save) -> None:
    path = save_pt({"epoch": 3, "weights": [1.0, 2.0]}, "odd.pt")
    with pytest.raises(ExportError, match=r"holds no state_dict.*keys are 'epoch', 'weights'"):
        checkpoint.load(path)


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ExportError, match=r"notes\.pt is not a readable torch file \("):
        checkpoint.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
