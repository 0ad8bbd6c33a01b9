"""``timm/<model name>`` as the architecture: every timm ResNet family exports and verifies,
a checkpoint with timm's own keys loads (head sized from it), --tta flip works with
ResNetV2's convolutional head, a non-ResNet exports with a warning, and bad names and tags
fail with one line (an offline --weights tag: test_export_cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from hub_folders import PHOTOS, calibrated, photos

from export.__main__ import main
from export.api import export_model
from service.metadata import ModelCard
from service.preprocess import Preprocessor

SIZE = 64  # a small input keeps each export to seconds; the graph is the same at 224


def card_of(path: Path) -> ModelCard:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return ModelCard.from_metadata_props(props)


@pytest.mark.parametrize(
    ("name", "resize"),
    [
        ("resnet10t", 73),  # ResNet with the -d/-t deep stem and average-pool shortcut
        ("seresnext26d_32x4d", 73),  # squeeze-excitation, ResNeXt grouped convolutions
        ("resnext50_32x4d", 67),  # ResNeXt without squeeze-excitation (crop_pct 0.95)
        ("ecaresnet26t", 73),  # efficient channel attention
        ("resnetrs50", 70),  # ResNet-RS (crop_pct 0.91)
        ("wide_resnet50_2", 73),  # wide bottlenecks (69 M parameters)
    ],  # ResNetV2 (1x1 conv head): test_checkpoint_with_timm_keys_and_flip below
)
def test_timm_resnet_families(name: str, resize: int, tmp_path: Path) -> None:
    result = export_model(
        f"timm/{name}", out=tmp_path, name=name, input_size=SIZE, verify_images=PHOTOS
    )
    card = result.card
    pre = card.preprocessing
    # floor(64 / crop_pct): timm's own eval transform at this input size.
    assert (pre.resize, pre.crop, pre.interpolation) == (resize, SIZE, "bicubic")
    prov = card.provenance
    assert (prov.arch, prov.source, prov.library) == (name, "timm", f"timm {timm.__version__}")
    assert (prov.weights, prov.trained) == (None, False)
    assert len(card.labels) == 1000 and card.labels[1] == "goldfish, Carassius auratus"
    v = card.verification
    assert v is not None and v.inputs == str(PHOTOS) and v.batch_sizes == (1, 8)
    assert max(v.max_rel_diff_logits, v.max_rel_diff_embedding) <= 1e-4
    assert v.top1_agreement == 1.0


def test_checkpoint_with_timm_keys_and_flip(tmp_path: Path) -> None:
    torch.manual_seed(18)
    model = calibrated(timm.create_model("resnetv2_18", num_classes=10), seed=18)
    ckpt = tmp_path / "resnetv2_18.pth"
    torch.save(model.state_dict(), ckpt)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    result = export_model(
        "timm/resnetv2_18", checkpoint_path=ckpt, labels=labels, out=tmp_path, name="v2",
        input_size=SIZE, tta="flip",
    )  # fmt: skip
    prov = result.card.provenance
    assert (prov.weights, prov.trained, prov.test_time_augmentation) == (ckpt.name, True, "flip")

    # The reference: timm's own forward, averaged over the image and its mirror by hand.
    prep = Preprocessor(result.card.preprocessing, max_pixels=10**8)
    x = np.stack([prep(f.read_bytes()) for f in photos()[:5]])
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"], {"input": x})
    with torch.no_grad():
        both = torch.cat([torch.from_numpy(x), torch.from_numpy(x).flip(3)])
        ref_logits = model(both).numpy()
        ref_emb = model.forward_head(model.forward_features(both), pre_logits=True).numpy()
    n = len(x)
    want_logits = (ref_logits[:n] + ref_logits[n:]) / 2
    want_emb = (ref_emb[:n] + ref_emb[n:]) / 2
    assert embedding.shape == (n, 512)
    for got, want in ((logits, want_logits), (embedding, want_emb)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_a_timm_model_outside_the_resnet_families_exports_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="export"):
        result = export_model("timm/test_convnext", out=tmp_path, name="convnext")
    assert (
        "test_convnext (timm.models.convnext.ConvNeXt) is not a ResNet: exported through timm's "
        "forward_features/forward_head contract and verified as usual" in caplog.text
    )
    v = result.card.verification
    assert v is not None and max(v.max_rel_diff_logits, v.max_rel_diff_embedding) <= 1e-4


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["timm/resnet50x"],
            f"unknown timm model 'resnet50x' in timm {timm.__version__}; close names: resnet50",
        ),
        (
            ["timm/resnet50d.a1_in1k"],
            "timm/resnet50d.a1_in1k: give the pretrained tag with --weights: "
            "timm/resnet50d --weights a1_in1k",
        ),
        (
            ["timm/resnet18", "--weights", "zz_in1k"],
            "timm has no resnet18 weights 'zz_in1k'; known tags: a1_in1k, ",
        ),
        (
            ["timm/resnet18", "--weights", "a1_in1k", "--labels", "{labels}"],
            "--weights a1_in1k has 1000 classes, not 3",
        ),
        (
            ["timm/resnet10t", "--checkpoint", "{ckpt}"],  # head sized from the checkpoint
            "timm/resnet10t has 7 classes and no names for them (only ImageNet-1k's 1000 are "
            "known): give their names with --labels FILE, one per line",
        ),
    ],
    ids=["typo", "tag-in-name", "unknown-tag", "tag-classes", "checkpoint-without-labels"],
)
def test_bad_timm_names_and_tags(
    args: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    ckpt = tmp_path / "seven.pth"
    torch.save(timm.create_model("resnet10t", num_classes=7).state_dict(), ckpt)
    argv = [a.format(labels=labels, ckpt=ckpt) for a in args]
    assert main([*argv, "--out", str(tmp_path / "models"), "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {reason}"), err
    assert not (tmp_path / "models").exists()
