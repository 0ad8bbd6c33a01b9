"""ONNX Runtime computes what PyTorch computes, for each architecture family, at two batch sizes.

Each exported file is checked against a reference model built here independently of the
exporter (same weights, the model's own forward), on real JPEGs, at batch sizes 2 and 5
(the exporter itself verified 1 and 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from export_testlib import perturb, trained_like
from torch import Tensor, nn

from export.api import export_model
from export.repository import ExportResult
from export.verify import folder_images
from service.metadata import ModelCard


@dataclass
class Case:
    result: ExportResult
    reference: nn.Module
    embedding_width: int
    num_classes: int

    @cached_property
    def session(self) -> ort.InferenceSession:
        return ort.InferenceSession(str(self.result.path), providers=["CPUExecutionProvider"])


def _torchvision_features(model: torchvision.models.ResNet, x: Tensor) -> Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def _reference_outputs(case: Case, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    model = case.reference
    with torch.no_grad():
        if isinstance(model, torchvision.models.ResNet):
            emb = _torchvision_features(model, x)
        else:
            emb = model.forward_features(x)  # type: ignore[operator]
        logits = model(x)
    return logits.numpy(), emb.numpy()


def _build_case(request: pytest.FixtureRequest, arch: str, tmp: Path, images: Path) -> Case:
    if arch == "cifar-resnet20":
        # Option A: the session's export from a training-script checkpoint (conftest.py).
        model, _ = request.getfixturevalue("trained_r20")
        return Case(request.getfixturevalue("trained_r20_export"), model, 64, 10)
    if arch == "resnet18":
        # Random weights (--weights none): the same seed rebuilds the same model.
        torch.manual_seed(18)
        result = export_model("resnet18", out=tmp, name="r18", verify_images=images)
        torch.manual_seed(18)
        return Case(result, torchvision.models.resnet18().eval(), 512, 1000)
    model = trained_like(arch, seed=len(arch))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel-style
    ckpt = tmp / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 7}, ckpt)
    result = export_model(
        arch, checkpoint_path=ckpt, out=tmp, name=arch, verify_images=images, version=4
    )
    width = 256 if "preact" in arch else 64
    return Case(result, model, width, 10)


ARCHS = ("resnet18", "cifar-resnet20", "cifar-resnet20-b", "cifar-preact-resnet56")


@pytest.fixture(scope="module", params=ARCHS)
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cifar_jpegs: Path
) -> Case:
    return _build_case(request, request.param, tmp_path_factory.mktemp("parity"), cifar_jpegs)


def test_exporter_verified_two_batch_sizes_within_tolerance(case: Case, cifar_jpegs: Path) -> None:
    v = case.result.card.verification
    assert v is not None
    assert v.batch_sizes == (1, 8)
    assert v.inputs == str(cifar_jpegs)
    assert v.max_rel_diff_logits < 1e-4
    assert v.max_rel_diff_embedding < 1e-4
    assert v.top1_agreement == 1.0
    assert "batch" in case.result.report


@pytest.mark.parametrize("batch", [2, 5])
def test_onnx_matches_independent_pytorch_reference(
    case: Case, cifar_jpegs: Path, batch: int
) -> None:
    props = {p.key: p.value for p in onnx.load(str(case.result.path)).metadata_props}
    card = ModelCard.from_metadata_props(props)
    x = folder_images(cifar_jpegs, batch, card.preprocessing)
    logits, emb = case.session.run(["logits", "embedding"], {"input": x.numpy()})
    ref_logits, ref_emb = _reference_outputs(case, x)
    assert logits.shape == (batch, case.num_classes)
    assert emb.shape == (batch, case.embedding_width)
    # float32 tolerance relative to the output's scale (see export/verify.py).
    assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert np.abs(emb - ref_emb).max() <= 1e-4 * np.abs(ref_emb).max()
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()
    assert np.abs(emb).max() > 0.01  # real features, not an all-zero output


def test_graph_has_dynamic_batch_and_standard_ops_only(case: Case) -> None:
    proto = onnx.load(str(case.result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    size = case.result.card.preprocessing.crop
    assert case.session.get_providers() == ["CPUExecutionProvider"]
    (inp,) = case.session.get_inputs()
    assert (inp.name, inp.type) == ("input", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, size, size]
    shapes = {o.name: o.shape[1:] for o in case.session.get_outputs()}
    assert shapes == {"logits": [case.num_classes], "embedding": [case.embedding_width]}


def test_perturb_makes_batch_norm_non_trivial() -> None:
    bn = perturb(nn.Sequential(nn.BatchNorm2d(4)), seed=1)[0]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
    assert not torch.allclose(bn.running_var, torch.ones(4))
