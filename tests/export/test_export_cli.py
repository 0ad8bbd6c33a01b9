"""``python -m export``: help with examples, a model on success, one line, exit 2 on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main
from service.metadata import ModelCard

REPO = Path(__file__).resolve().parents[2]


def test_help_shows_every_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m export resnet50 --weights none --out models --name resnet50" in out
    assert "--checkpoint runs/r20/best.pt --out models --name cifar10-resnet20" in out
    assert "python -m export my_models.resnet:resnet20 --checkpoint r20.th" in out
    assert "cifar-preact-resnet<9n+2>" in out and "wide_resnet50_2" in out
    assert "timm/<model name>" in out and "Hub folder" in out and "FILE.onnx" in out
    assert "Exit status 0 on success; 2 with a one-line `error: ...`" in out


def test_user_module_export(
    tmp_path: Path, user_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    code = main([
        "tiny_models.nets:tiny_resnet", "--code-path", str(user_models), "--labels", str(labels),
        "--input-size", "16", "--resize", "20", "--mean", "0.4", "0.5", "0.6",
        "--std", "0.2", "0.25", "0.3", "--channel-order", "BGR", "--embedding-layer", "pool",
        "--out", str(tmp_path / "models"), "--name", "tiny", "--version", "3", "--overwrite",
    ])  # fmt: skip
    assert code == 0
    path = tmp_path / "models" / "tiny" / "3" / "model.onnx"
    assert capsys.readouterr().out.strip() == f"{path}  (3 classes, version 3)"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # --embedding-layer pool: the pooled 24-channel map, not the 40-wide input of `head`.
    assert [o.shape for o in session.get_outputs()] == [["batch", 3], ["batch", 24]]
    card = ModelCard.from_metadata_props(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    )
    assert card.labels == ("red", "green", "blue")
    pre = card.preprocessing
    assert (pre.resize, pre.crop, pre.channel_order) == (20, 16, "BGR")
    assert (pre.mean, pre.std) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert card.provenance.trained is False and card.provenance.weights is None


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["resnet9"], "error: unknown architecture 'resnet9': expected one of resnet18, "),
        (
            ["resnet18", "--weights", "IMAGENET1K_V9"],
            "error: resnet18 has no weights 'IMAGENET1K_V9'; known: DEFAULT, IMAGENET1K_V1, none",
        ),
        (
            ["cifar-resnet20", "--weights", "DEFAULT"],
            "error: --weights DEFAULT applies to torchvision and timm architectures only",
        ),
        (["cifar-resnet20", "--name", "../up"], "error: model name '../up' may hold only letters"),
        (["cifar-resnet20", "--checkpoint", "nope.pt"], "error: checkpoint nope.pt does not exist"),
    ],
)
def test_failures_are_one_line(
    args: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*args, "--out", str(tmp_path)]
    if "--name" not in argv:
        argv += ["--name", "m"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(reason)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "r32.pt"
    from export import cifar_resnet

    torch.save(cifar_resnet.build("cifar-resnet32").state_dict(), ckpt)
    assert main(["cifar-resnet20", "--checkpoint", str(ckpt), "--out", str(tmp_path),
                 "--name", "m"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: checkpoint does not match cifar-resnet20: 72 unexpected keys (")


@pytest.mark.parametrize(
    ("source", "weights", "reason"),
    [
        (
            "resnet18",
            "IMAGENET1K_V1",
            "error: cannot download resnet18 weights IMAGENET1K_V1 from "
            "https://download.pytorch.org/models/resnet18-f37072fd.pth (",
        ),
        (
            "timm/resnet18",
            "a1_in1k",
            "error: cannot download timm weights resnet18.a1_in1k from "
            "https://huggingface.co/timm/resnet18.a1_in1k (",
        ),
    ],
    ids=["torchvision", "timm"],
)
def test_offline_weights_fail_with_a_clear_reason(
    source: str, weights: str, reason: str, tmp_path: Path
) -> None:
    # A proxy on a closed local port makes the download fail at once, online or not, and
    # empty TORCH_HOME and HF_HOME make sure no cached file is used: nothing is ever
    # downloaded here.
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    closed = "http://127.0.0.1:9"
    env.update(HTTPS_PROXY=closed, https_proxy=closed, HTTP_PROXY=closed, http_proxy=closed)
    env.update(TORCH_HOME=str(tmp_path / "torch-home"), HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "export", source, "--weights", weights,
         "--out", str(tmp_path / "models"), "--name", "r18"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.splitlines()[-1]]
    assert errors[0].startswith(reason)
    assert "looks offline" in errors[0] and "--checkpoint" in errors[0]
    assert not (tmp_path / "models").exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pth", ".bin", ".safetensors")]
