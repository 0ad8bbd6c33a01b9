"""Checkpoint keys fitted to the model's: a torch older than BatchNorm's num_batches_tracked
(accepted exactly where load_state_dict(strict=True) accepts it), any wrapper's prefix
(DataParallel, torch.compile, Lightning, nested) stripped or added, found from the model's
own keys; and a mismatch reported with the real differences."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_testlib import (
    ARCH,
    LitLike,
    assert_same_weights,
    fail_cli,
    lightning,
    loaded,
)
from export_testlib import trained_like
from torch import nn

from export import checkpoint, cifar_resnet
from export.__main__ import main
from export.errors import ExportError
from export.labels import CIFAR10_CLASSES
from service.engine import Engine
from service.preprocess import Preprocessor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-val"
BN_COUNT = 19  # batch norms in a ResNet-20: the stem's and two per block in nine blocks

Save = Callable[[object, str], Path]


class Backbone(nn.Module):
    """A user's model that holds the network as ``self.backbone``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = cifar_resnet.build(ARCH)


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return trained_like(ARCH, seed=31)


def _without_batch_counts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every ``num_batches_tracked`` deleted in place (its ``_metadata`` kept)."""
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    return state


def test_pre_041_checkpoint_exports_and_serves_like_the_original(
    source: nn.Module, save_pt: Save, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As an old CIFAR ResNet repository ships its files: saved from DataParallel by a torch
    # older than 0.4.1, so no batch norm has num_batches_tracked and there is no _metadata.
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = save_pt({"state_dict": _without_batch_counts(state), "best_prec1": 91.7}, "r20.th")
    caplog.set_level(logging.INFO, logger="export")
    argv = [ARCH, "--checkpoint", str(path), "--out", str(tmp_path), "--name", "r20"]
    assert main([*argv, "--verify-images", str(FIXTURES)]) == 0
    assert "removing the prefix 'module.' from its keys" in caplog.text

    engine = Engine(tmp_path / "r20" / "1" / "model.onnx", providers=("cpu",))
    assert engine.card.provenance.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert engine.card.labels == CIFAR10_CLASSES
    pre = Preprocessor(engine.card.preprocessing, max_pixels=1 << 20)
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted(FIXTURES.iterdir())]
    batch = np.stack([pre(f.read_bytes()) for f in files])
    served = engine.run(batch)["logits"]
    with torch.no_grad():
        expected = source(torch.from_numpy(batch)).numpy()
    assert served.shape == (10, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert served.argmax(1).tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize(("version", "loads"), [(None, True), (1, True), (2, False)])
def test_missing_batch_counts_load_exactly_when_torch_loads_them(
    version: int | None, loads: bool, source: nn.Module, save_pt: Save
) -> None:
    # BatchNorm fills num_batches_tracked only for a state_dict from before its version 2.
    state = _without_batch_counts(source.state_dict())
    if version is None:
        del state._metadata  # type: ignore[attr-defined]
    else:
        for name, module in source.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                state._metadata[name]["version"] = version  # type: ignore[attr-defined]
    path = save_pt(state, "old.pt")
    torch_loads = True
    try:
        cifar_resnet.build(ARCH).load_state_dict(torch.load(path, weights_only=True))
    except RuntimeError:
        torch_loads = False
    assert torch_loads is loads
    if loads:
        model = loaded(path)
        # torch fills in the fresh model's count, 0, as the untrained source's counts are.
        assert model.state_dict()["bn1.num_batches_tracked"].item() == 0
        assert_same_weights(model, source)
        return
    with pytest.raises(ExportError) as info:
        loaded(path)
    assert str(info.value) == (
        f"checkpoint does not match {ARCH}: {BN_COUNT} missing keys (bn1.num_batches_tracked, "
        "layer1.0.bn1.num_batches_tracked, layer1.0.bn2.num_batches_tracked, "
        "layer1.1.bn1.num_batches_tracked, layer1.1.bn2.num_batches_tracked, "
        "layer1.2.bn1.num_batches_tracked, layer1.2.bn2.num_batches_tracked, "
        "layer2.0.bn1.num_batches_tracked, ... and 11 more)"
    )


def test_data_parallel_versions_follow_the_stripped_prefix(save_pt: Save) -> None:
    # The _metadata says version 2 under "module.bn1": stripping the prefix must rename it,
    # or the missing counts would be filled where torch (loading into DataParallel) refuses.
    state = _without_batch_counts(nn.DataParallel(cifar_resnet.build(ARCH)).state_dict())
    path = save_pt(state, "dp.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        nn.DataParallel(cifar_resnet.build(ARCH)).load_state_dict(torch.load(path))
    with pytest.raises(ExportError) as info:
        loaded(path)
    assert str(info.value).startswith(
        f"checkpoint does not match {ARCH} (keys read without their 'module.' prefix): "
        f"{BN_COUNT} missing keys (bn1.num_batches_tracked, layer1.0.bn1.num_batches_tracked, "
    )


def test_lightning_checkpoint(
    source: nn.Module, save_pt: Save, caplog: pytest.LogCaptureFixture
) -> None:
    path = save_pt(lightning(LitLike(source).state_dict()), "epoch=7-step=1400.ckpt")
    caplog.set_level(logging.INFO, logger="export")
    assert_same_weights(loaded(path), source)
    assert "checkpoint: Lightning 2.4.0, epoch 7, global step 1400" in caplog.text
    assert "removing the prefix 'model.' from its keys" in caplog.text
    assert "leaving out 1 key outside 'model.' (loss.weight)" in caplog.text


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (lambda m: torch.compile(LitLike(m)), "'_orig_mod.model.'"),
        (lambda m: LitLike(nn.DataParallel(m)), "'model.module.'"),
    ],
)
def test_nested_prefix(
    wrap: Callable[[nn.Module], nn.Module],
    prefix: str,
    source: nn.Module,
    save_pt: Save,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = save_pt({"state_dict": wrap(source).state_dict()}, "nested.pt")
    caplog.set_level(logging.INFO, logger="export")
    assert_same_weights(loaded(path), source)
    assert f"removing the prefix {prefix} from its keys" in caplog.text


def test_prefix_added_for_a_model_that_wraps_the_network(
    source: nn.Module, save_pt: Save, caplog: pytest.LogCaptureFixture
) -> None:
    path = save_pt(source.state_dict(), "plain.pt")
    caplog.set_level(logging.INFO, logger="export")
    model = Backbone()
    checkpoint.apply(model, checkpoint.load(path).state_dict, what="user:Backbone")
    assert_same_weights(model.backbone, source)
    assert "adding the prefix 'backbone.' to its keys" in caplog.text


def test_two_equally_good_prefixes_are_refused(source: nn.Module, save_pt: Save) -> None:
    state = {f"{p}.{k}": v for p in ("model", "ema") for k, v in source.state_dict().items()}
    with pytest.raises(ExportError) as info:
        loaded(save_pt(lightning(state), "ema.ckpt"))
    assert str(info.value) == (
        f"checkpoint does not match {ARCH} unambiguously: its keys match the model's equally "
        "well with the prefixes 'ema.', 'model.'; re-save the weights to export alone"
    )


def test_lightning_checkpoint_of_another_network(
    save_pt: Save, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A small plain CNN, trained with a LightningModule, exported as a ResNet-20 by mistake.
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(8, 10))
    path = save_pt(lightning(LitLike(other).state_dict()), "other.ckpt")
    assert fail_cli(["--checkpoint", str(path)], capsys, tmp_path) == (
        f"error: checkpoint does not match {ARCH}: none of its 10 keys is one of the model's "
        "116, with or without a prefix; nearest (checkpoint key ~ model key): "
        "model.1.num_batches_tracked ~ bn1.num_batches_tracked, "
        "model.1.running_mean ~ bn1.running_mean, model.1.running_var ~ bn1.running_var"
    )
