"""Everything the exporter stores in the ONNX file reads back equal, through ONNX Runtime."""

from __future__ import annotations

import datetime as dt
import json

import onnx
import onnxruntime as ort
import pytest
import torch

from export import builders
from export.labels import CIFAR10_CLASSES
from export.repository import ExportResult
from service.metadata import FORMAT, ModelCard

V2 = "IMAGENET1K_V2"
TISSUE = "toilet tissue"


def test_card_round_trips_through_onnxruntime(trained_r20_export: ExportResult) -> None:
    session = ort.InferenceSession(str(trained_r20_export.path), providers=["CPUExecutionProvider"])
    stored = session.get_modelmeta().custom_metadata_map
    assert set(stored) == {"format", "labels", "preprocessing", "provenance", "verification"}
    assert stored["format"] == FORMAT
    card = ModelCard.from_metadata_props(stored)
    assert card == trained_r20_export.card
    assert card.verification is not None
    assert card.verification == trained_r20_export.card.verification


def test_metadata_props_are_exactly_the_card(trained_r20_export: ExportResult) -> None:
    proto = onnx.load(str(trained_r20_export.path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props == trained_r20_export.card.to_metadata_props()
    # Each field is plain JSON, readable with onnx or Netron alone.
    assert json.loads(props["labels"])[:2] == ["cat", "dog"]
    assert json.loads(props["preprocessing"])["resize"] == 32


def test_crop_rounding_is_written_only_when_not_the_default(
    trained_r20_export: ExportResult,
) -> None:
    """An older server, which knows no ``crop_rounding``, still reads every card that keeps
    torchvision's rounding; a transformers card says 'floor' and reads back equal."""
    card = trained_r20_export.card
    assert card.preprocessing.crop_rounding == "half_even"
    written = json.loads(card.to_metadata_props()["preprocessing"])
    assert set(written) == {"resize", "crop", "mean", "std"}

    floor = card.preprocessing.model_copy(update={"crop_rounding": "floor"})
    props = card.model_copy(update={"preprocessing": floor}).to_metadata_props()
    assert json.loads(props["preprocessing"]) == {**written, "crop_rounding": "floor"}
    assert ModelCard.from_metadata_props(props).preprocessing == floor


def test_provenance_describes_the_export(trained_r20_export: ExportResult) -> None:
    proto = onnx.load(str(trained_r20_export.path))
    p = trained_r20_export.card.provenance
    assert (p.arch, p.source) == ("cifar-resnet20", "cifar")
    assert p.opset == proto.opset_import[0].version == 18
    assert p.torch_version == torch.__version__
    assert p.exporter_version.startswith("torch.onnx dynamo (torch ")
    assert "onnxscript" in p.exporter_version
    exported = dt.datetime.fromisoformat(p.exported_at)
    assert abs(dt.datetime.now(dt.UTC) - exported) < dt.timedelta(hours=1)
    assert len(p.checkpoint_sha256 or "") == 64


def test_verification_figures_are_stored(trained_r20_export: ExportResult) -> None:
    v = trained_r20_export.card.verification
    assert v is not None
    assert v.batch_sizes == (1, 8)
    assert v.tolerance == 1e-4
    assert 0 <= v.max_abs_diff_logits < 1e-3
    assert 0 <= v.max_rel_diff_logits <= v.tolerance
    assert 0 <= v.max_rel_diff_embedding <= v.tolerance
    assert v.top1_agreement == 1.0
    assert "verification on" in trained_r20_export.report


@pytest.mark.parametrize(
    ("arch", "weights", "expected"),
    [
        ("resnet50", "IMAGENET1K_V2", (232, 224, "bilinear", "IMAGENET1K_V2")),
        ("resnet50", "DEFAULT", (232, 224, "bilinear", "IMAGENET1K_V2")),
        ("resnet152", "IMAGENET1K_V1", (256, 224, "bilinear", "IMAGENET1K_V1")),
        (
            "resnext50_32x4d",
            "ResNeXt50_32X4D_Weights.IMAGENET1K_V2",
            (232, 224, "bilinear", "IMAGENET1K_V2"),
        ),
        ("resnet18", None, (256, 224, "bilinear", None)),
    ],
)
def test_torchvision_preprocessing_comes_from_the_weights(
    arch: str, weights: str | None, expected: tuple[int, int, str, str | None]
) -> None:
    # Read from torchvision's weight descriptions: nothing is downloaded.
    d = builders.torchvision_defaults(arch, weights)
    assert (d.resize, d.crop, d.interpolation, d.weights) == expected
    assert d.mean == (0.485, 0.456, 0.406) and d.std == (0.229, 0.224, 0.225)
    assert d.labels is not None and len(d.labels) == 1000
    assert (d.labels[0], d.labels[207], d.labels[999]) == (
        "tench",
        "golden retriever",
        "toilet tissue",
    )


def test_cifar_defaults() -> None:
    d = builders.CIFAR_DEFAULTS
    assert (d.resize, d.crop) == (32, 32)
    assert d.labels == CIFAR10_CLASSES
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[9] == "truck"
