"""Hub folders as ``python -m export DIR``: timm and transformers folders, saved the way their
libraries save them, exported with the card their config says, and computing what the
library's own model computes. Bad folders fail with one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import transformers
from hub_folders import IMAGENET_MEAN, IMAGENET_STD, photos, timm_folder, transformers_folder

from export.__main__ import main
from service.metadata import ModelCard, Preprocessing
from service.preprocess import Preprocessor

TIMM_LABELS = ["ant", "bee", "cat", "dog", "eel"]
HF_LABELS = ["red", "green", "blue"]
# 64-pixel inputs keep the exports quick; crop_pct 0.95 makes floor(64 / 0.95) = 67.
TIMM_DATA = {"input_size": (3, 64, 64), "crop_pct": 0.95}
HF_PROCESSOR = {
    "size": {"shortest_edge": 64},
    "crop_pct": 0.875,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}
# ONNX Runtime against the library's PyTorch model on the same tensors: float32 rounding.
RTOL = 1e-4


def card_of(path: Path) -> ModelCard:
    return ModelCard.from_metadata_props(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    )


def run_onnx(
    path: Path, pre: Preprocessing, n: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs as the service preprocesses the first ``n`` photos, logits, embedding)."""
    prep = Preprocessor(pre, max_pixels=10**8)
    x = np.stack([prep(f.read_bytes()) for f in photos()[:n]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"], {"input": x})
    return x, logits, embedding


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)


def export(argv: list[str], tmp: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main([*argv, "--out", str(tmp / "models"), "--name", "m"]) == 0, capsys.readouterr().err
    return Path(capsys.readouterr().out.split()[0])


def fail(argv: list[str], tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a refused export (exit 2, nothing written)."""
    assert main([*argv, "--out", str(tmp / "models"), "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp / "models").exists()
    return err.strip()


def edited_copy(folder: Path, to: Path, name: str, **changes: object) -> Path:
    """A copy of ``folder`` whose JSON file ``name`` has ``changes`` (None deletes a key)."""
    shutil.copytree(folder, to)
    content = json.loads((to / name).read_text())
    content.update(changes)
    (to / name).write_text(json.dumps({k: v for k, v in content.items() if v is not None}))
    return to


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "resnet10t"
    timm_folder(
        folder, "resnet10t", seed=10, num_classes=5, data_config=TIMM_DATA,
        model_config={"label_names": TIMM_LABELS},
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In the Hub cache's layout, whose repository name the card's arch records."""
    folder = tmp_path_factory.mktemp("hf") / "models--acme--tiny-resnet" / "snapshots" / "0a1b"
    transformers_folder(folder, seed=3, labels=HF_LABELS, processor=HF_PROCESSOR)
    return folder


def test_timm_folder(timm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export([str(timm_dir)], tmp_path, capsys)
    card = card_of(path)
    assert card.labels == tuple(TIMM_LABELS)
    assert card.preprocessing == Preprocessing(
        resize=67, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
    )
    weights = timm_dir / "model.safetensors"
    prov = card.provenance
    assert (prov.arch, prov.source, prov.library) == (
        "resnet10t",
        "timm",
        f"timm {timm.__version__}",
    )
    assert prov.config_sha256 == hashlib.sha256((timm_dir / "config.json").read_bytes()).hexdigest()
    assert (prov.weights, prov.trained) == ("model.safetensors", True)
    assert prov.checkpoint_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()

    # timm's own reading of the folder, weights included, is the reference.
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    x, logits, embedding = run_onnx(path, card.preprocessing)
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(x))
        assert_close(logits, model(torch.from_numpy(x)).numpy())
        assert_close(embedding, model.forward_head(features, pre_logits=True).numpy())


def test_timm_folder_flags_override_and_imagenet_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bin"  # pytorch_model.bin, save_for_hf's default; 1000 classes
    timm_folder(folder, "resnet10t", seed=11, safetensors=False, data_config=TIMM_DATA)
    path = export([
        str(folder), "--input-size", "48", "--resize", "56", "--mean", "0.5", "0.5", "0.5",
        "--std", "0.25", "0.25", "0.25", "--interpolation", "bilinear",
    ], tmp_path, capsys)  # fmt: skip
    card = card_of(path)
    assert card.preprocessing == Preprocessing(
        resize=56, crop=48, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear"
    )
    assert len(card.labels) == 1000 and card.labels[0] == "tench, Tinca tinca"
    assert card.provenance.weights == "pytorch_model.bin"


def test_timm_folder_labels(
    timm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nameless = edited_copy(timm_dir, tmp_path / "nameless", "config.json", label_names=None)
    assert fail([str(nameless)], tmp_path, capsys) == (
        f"error: {nameless} has 5 classes and no names for them (only ImageNet-1k's 1000 are "
        "known): give their names with --labels FILE, one per line"
    )
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    assert fail([str(nameless), "--labels", str(three)], tmp_path, capsys) == (
        f"error: the model has 5 outputs but {three} holds 3 labels"
    )


def test_transformers_folder(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = export([str(hf_dir)], tmp_path, capsys)
    card = card_of(path)
    assert card.labels == tuple(HF_LABELS)
    # ConvNextImageProcessor: shorter side int(64 / 0.875) = 73, center crop 64 starting at
    # (side - 64) // 2, bicubic.
    assert card.preprocessing == Preprocessing(
        resize=73,
        crop=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        crop_rounding="floor",
    )
    stored = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(stored["preprocessing"])["crop_rounding"] == "floor"
    prov = card.provenance
    assert prov.arch == "ResNetForImageClassification (acme/tiny-resnet)"
    assert (prov.source, prov.library) == (
        "transformers",
        f"transformers {transformers.__version__}",
    )
    assert prov.config_sha256 == hashlib.sha256((hf_dir / "config.json").read_bytes()).hexdigest()
    assert (prov.weights, prov.trained) == ("model.safetensors", True)

    model = transformers.ResNetForImageClassification.from_pretrained(hf_dir).eval()
    x, logits, embedding = run_onnx(path, card.preprocessing)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
        pooled = model.resnet(torch.from_numpy(x)).pooler_output
    assert_close(logits, out.logits.numpy())
    assert embedding.shape == (len(x), 128)
    assert_close(embedding, torch.flatten(pooled, 1).numpy())


EXPECTED = (
    'expected config.json with `architecture` (timm) or `"model_type": "resnet"` (transformers)'
)
WEIGHTS = (
    "model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
    "pytorch_model.bin.index.json"
)
SAFETENSORS = ("model.safetensors",)  # empty: each case fails before the weights are read


@pytest.mark.parametrize(
    ("config", "files", "reason"),
    [
        (None, (), "{dir} is not a Hub model folder: " + EXPECTED + "; found an empty folder"),
        (
            {"hidden": 3, "layers": 2},
            (),
            "{dir}/config.json is neither a timm nor a transformers config: "
            + EXPECTED
            + "; its keys are hidden, layers",
        ),
        (
            {"model_type": "vit", "architectures": ["ViTModel"]},
            (),
            "{dir}/config.json describes a transformers 'vit' model (ViTModel), not a ResNet: "
            'expected "model_type": "resnet"',
        ),
        (
            {"architecture": "resnet18"},
            ("README.md",),
            "{dir} has no weights file: expected one of "
            + WEIGHTS
            + " beside config.json; found README.md, config.json",
        ),
        (
            {"architecture": "resnet10x"},
            SAFETENSORS,
            "unknown timm model 'resnet10x' (the architecture in {dir}/config.json) in "
            f"timm {timm.__version__}; close names: resnet10t, ",
        ),
        (
            {"model_type": "resnet", "architectures": ["ResNetModel"]},
            SAFETENSORS,
            "{dir}/config.json names ResNetModel: a ResNet without its classification head; "
            "the export needs a ResNetForImageClassification folder",
        ),
        (
            {"model_type": "resnet"},
            SAFETENSORS,
            "{dir} has no preprocessor_config.json (what the image processor's save_pretrained "
            "writes beside config.json): it says how images are resized and normalized",
        ),
    ],
    ids=["empty", "unknown", "not-resnet", "no-weights", "timm-typo", "headless", "no-processor"],
)
def test_bad_folders(
    config: dict[str, object] | None,
    files: tuple[str, ...],
    reason: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"")
    assert fail([str(folder)], tmp_path, capsys).startswith("error: " + reason.format(dir=folder))


def test_folder_refuses_other_weights(
    timm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fail([str(timm_dir), "--weights", "a1_in1k"], tmp_path, capsys) == (
        f"error: --weights a1_in1k applies to torchvision and timm architectures only; "
        f"{timm_dir} is a Hub folder with its own weights"
    )
    ckpt = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    assert fail([str(timm_dir), "--checkpoint", str(ckpt)], tmp_path, capsys) == (
        f"error: {timm_dir} is a Hub folder with its own weights: drop --checkpoint"
    )


def test_squashing_processor_needs_sizes(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = edited_copy(
        hf_dir, tmp_path / "squash", "preprocessor_config.json", size={"shortest_edge": 384}
    )
    assert fail([str(folder)], tmp_path, capsys) == (
        "error: preprocessor_config.json cannot be served as is: its shortest_edge is 384: "
        "from 384 up ConvNextImageProcessor squashes images to 384x384 without keeping their "
        "aspect ratio: give --input-size and --resize to serve it with a shorter-side resize "
        "and a square center crop instead"
    )


def test_timm_crop_modes_other_than_center_need_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "border"
    data_config = {**TIMM_DATA, "crop_mode": "border"}
    labels = {"label_names": TIMM_LABELS}
    timm_folder(
        folder, "resnet10t", seed=12, num_classes=5, data_config=data_config, model_config=labels
    )
    assert fail([str(folder)], tmp_path, capsys) == (
        "error: timm's eval transform cannot be served as is: its crop mode is 'border' (the "
        "card describes 'center' only): give --input-size and --resize to serve it with a "
        "shorter-side resize and a square center crop instead"
    )


def test_configs_the_library_cannot_build(
    timm_dir: Path, hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = json.loads((timm_dir / "config.json").read_text())["model_args"]
    odd_timm = edited_copy(
        timm_dir, tmp_path / "odd-timm", "config.json", model_args={**args, "bogus": 3}
    )
    assert fail([str(odd_timm)], tmp_path, capsys) == (
        f"error: timm {timm.__version__} cannot build resnet10t from {odd_timm}/config.json: "
        "TypeError: ResNet.__init__() got an unexpected keyword argument 'bogus'"
    )
    odd_hf = edited_copy(hf_dir, tmp_path / "odd-hf", "config.json", layer_type="weird")
    assert fail([str(odd_hf)], tmp_path, capsys).startswith(
        f"error: transformers {transformers.__version__} cannot build a "
        f"ResNetForImageClassification from {odd_hf}/config.json: "
    )
