"""Every file format a checkpoint comes in: torch files, safetensors, sharded sets (as
huggingface_hub writes them for transformers' save_pretrained) and Hugging Face folders; and
broken or unsafe files refused with one line that names the file and what is wrong."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoint_testlib import ARCH, LitLike, assert_same_weights, fail_cli, lightning, loaded
from export_testlib import trained_like
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

from export import checkpoint
from export.__main__ import main
from service.engine import Engine

SHARD_SIZE = "200KB"  # a ResNet-20's 1.1 MB of tensors in 7 shards

Save = Callable[[object, str], Path]


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return trained_like(ARCH, seed=31)


def test_safetensors_file_and_folder(source: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path, metadata={"format": "pt"})
    for given in (path, tmp_path):
        ckpt = checkpoint.load(given)
        assert ckpt.path == path
        assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert_same_weights(loaded(given), source)


@pytest.mark.parametrize(
    ("safe", "index_name", "shard"),
    [
        (True, "model.safetensors.index.json", "model-00001-of-00007.safetensors"),
        (False, "pytorch_model.bin.index.json", "pytorch_model-00001-of-00007.bin"),
    ],
)
def test_sharded_set(
    safe: bool, index_name: str, shard: str, source: nn.Module, tmp_path: Path
) -> None:
    save_torch_state_dict(
        source.state_dict(), tmp_path, max_shard_size=SHARD_SIZE, safe_serialization=safe
    )
    index = tmp_path / index_name
    written = json.loads(index.read_text())
    assert written["metadata"]["total_size"] > 1_000_000
    assert sorted(set(written["weight_map"].values()))[0] == shard
    shards = sorted(tmp_path.glob("*-of-00007.*"))
    assert len(shards) == 7
    expected_sha = hashlib.sha256(b"".join(p.read_bytes() for p in [index, *shards]))
    for given in (index, tmp_path):
        ckpt = checkpoint.load(given)
        assert (ckpt.path, ckpt.sha256) == (index, expected_sha.hexdigest())
        assert_same_weights(loaded(given), source)


def test_sharded_safetensors_export(
    source: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    save_torch_state_dict(source.state_dict(), folder, max_shard_size=SHARD_SIZE)
    index = folder / "model.safetensors.index.json"
    argv = [ARCH, "--checkpoint", str(index), "--out", str(tmp_path / "models"), "--name", "r20"]
    assert main(argv) == 0
    model_file = tmp_path / "models" / "r20" / "1" / "model.onnx"
    assert capsys.readouterr().out.strip() == f"{model_file}  (10 classes, version 1)"
    card = Engine(model_file, providers=("cpu",)).card
    assert card.provenance.weights == "model.safetensors.index.json"
    assert card.provenance.checkpoint_sha256 == checkpoint.load(index).sha256


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:-100], "incomplete metadata, file not fully covered"),
        (lambda _: b"these are not the weights you are looking for", "header too large"),
    ],
    ids=["truncated", "text"],
)
def test_broken_safetensors(
    damage: Callable[[bytes], bytes],
    reason: str,
    source: nn.Module,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    path.write_bytes(damage(path.read_bytes()))
    assert fail_cli(["--checkpoint", str(path)], capsys, tmp_path) == (
        f"error: checkpoint {path} is not a valid safetensors file ({reason})"
    )


def test_sharded_index_naming_a_missing_shard(
    source: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_torch_state_dict(source.state_dict(), tmp_path, max_shard_size=SHARD_SIZE)
    (tmp_path / "model-00004-of-00007.safetensors").unlink()
    index = tmp_path / "model.safetensors.index.json"
    assert fail_cli(["--checkpoint", str(index)], capsys, tmp_path) == (
        f"error: checkpoint index {index} names 1 shard missing from {tmp_path}: "
        "model-00004-of-00007.safetensors"
    )


def test_folder_without_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert fail_cli(["--checkpoint", str(tmp_path)], capsys, tmp_path) == (
        f"error: checkpoint folder {tmp_path} holds none of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
    )


def test_file_that_weights_only_refuses(
    source: nn.Module, save_pt: Save, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Older training scripts saved their argparse flags as they were: a Namespace object.
    flags = argparse.Namespace(lr=0.1, arch="resnet20")
    path = save_pt(lightning(LitLike(source).state_dict(), hyper_parameters=flags), "hp.ckpt")
    assert fail_cli(["--checkpoint", str(path)], capsys, tmp_path) == (
        f"error: checkpoint {path} cannot be loaded with weights_only=True: it pickles "
        "argparse.Namespace, and loading it would run code; if you trust the file, re-save "
        f"its weights alone, e.g. torch.save(torch.load('{path}', weights_only=False)"
        "['state_dict'], 'weights.pt') (for a pickled model: .state_dict()), or save them "
        "with safetensors.torch.save_file"
    )
