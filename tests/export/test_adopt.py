"""Adopting ONNX files other tools wrote: ``python -m export FILE.onnx``.

The sources are made here, as users get them: ``torch.onnx.export`` of small ResNets with
perturbed (trained-looking) random weights under other tensor names, at a fixed batch of 1
or with dynamic axes, one ending in a Softmax, one through timm's own ONNX export helper,
and one whose graph bakes in batch 1. The adopted file must give the original file's
logits, the PyTorch model's pooled features (the input of ``fc``) as its embedding, run at
batch 1 and 3 where the graph allows it, carry the card, and load in the service's Engine.
Bad input is refused with one line and exit status 2. Each source is made once per module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from export_testlib import perturb
from timm.utils.onnx import onnx_export
from torch import nn

from export.__main__ import main
from export.adopt import adopt_onnx
from export.repository import ExportResult
from service.engine import Engine, softmax
from service.metadata import ModelCard
from service.preprocess import Preprocessor
from service.repository import scan

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
CLASSES = 7
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NORMALIZE = ["--mean", *map(str, MEAN), "--std", *map(str, STD)]


@dataclass(frozen=True)
class Source:
    """An ONNX file another tool wrote, and the PyTorch model it was exported from."""

    path: Path
    net: nn.Module
    """Computes the logits (without the Softmax the file may end in)."""
    fc: nn.Linear
    """The final layer, whose input is the embedding."""
    batch: int | None
    """The file's fixed batch size, None when dynamic."""


def _resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return perturb(torchvision.models.resnet18(num_classes=CLASSES), seed=seed)


def _torch_export(model: nn.Module, path: Path, names: tuple[str, str], *, dynamic: bool) -> None:
    axes = {names[0]: {0: "n"}, names[1]: {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation chatter
        torch.onnx.export(
            model.eval(), (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=[names[0]],
            output_names=[names[1]], dynamic_axes=axes, dynamo=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    root = tmp_path_factory.mktemp("sources")
    made: dict[str, Source] = {}
    net = _resnet18(1)
    _torch_export(net, root / "resnet18_fixed.onnx", ("data", "output"), dynamic=False)
    made["fixed"] = Source(root / "resnet18_fixed.onnx", net, net.fc, 1)
    net = _resnet18(2)
    _torch_export(net, root / "resnet18_dynamic.onnx", ("pixel_values", "output"), dynamic=True)
    made["dynamic"] = Source(root / "resnet18_dynamic.onnx", net, net.fc, None)
    net = _resnet18(3)
    # The dynamo exporter at a fixed batch: its flatten is a Reshape to the constant [1, 512].
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), dynamo=True)
    assert program is not None
    program.save(str(root / "model.onnx"))
    made["dynamo"] = Source(root / "model.onnx", net, net.fc, 1)
    net = _resnet18(4)
    probs = nn.Sequential(net, nn.Softmax(dim=1))
    _torch_export(probs, root / "resnet18_softmax.onnx", ("data", "prob"), dynamic=False)
    made["softmax"] = Source(root / "resnet18_softmax.onnx", net, net.fc, 1)
    torch.manual_seed(5)
    net = perturb(timm.create_model("resnet18", num_classes=CLASSES), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it uses the TorchScript exporter, deprecated
        onnx_export(net, str(root / "timm_resnet18.onnx"), input_size=(3, SIZE, SIZE), batch_size=2)
    made["timm"] = Source(root / "timm_resnet18.onnx", net, net.fc, None)
    net = _resnet18(6)
    # Flattening the whole batch (start_dim 0) bakes batch 1 into the graph.
    head = [nn.Flatten(0), nn.Unflatten(0, (1, 512)), net.fc]
    one = nn.Sequential(*list(net.children())[:-1], *head)
    _torch_export(one, root / "batch_one.onnx", ("data", "output"), dynamic=False)
    made["batch_one"] = Source(root / "batch_one.onnx", one, net.fc, 1)
    return made


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(CLASSES)))
    return path


def _adopt(source: Source, out: Path, labels: Path, **kwargs: object) -> ExportResult:
    return adopt_onnx(
        source.path, out=out, name="adopted", labels=labels, mean=MEAN, std=STD, **kwargs
    )


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)


def _pytorch(source: Source, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, the input of fc) from the PyTorch model the file was exported from."""
    features: list[torch.Tensor] = []
    hook = source.fc.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    try:
        with torch.no_grad():
            logits = source.net.eval()(torch.from_numpy(x))
    finally:
        hook.remove()
    return logits.numpy(), features[0].numpy()


def _original(source: Source, x: np.ndarray) -> np.ndarray:
    """The original file's only output, a row at a time where its batch is fixed."""
    session = ort.InferenceSession(str(source.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [x[i : i + 1] for i in range(len(x))] if source.batch else [x]
    return np.concatenate([session.run(None, {name: row})[0] for row in rows])


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    """Equal within ``rel`` of the reference's largest magnitude (agreement.diff's measure)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * float(np.abs(want).max()))


@pytest.mark.parametrize("case", ["fixed", "dynamic", "dynamo", "softmax", "timm"])
def test_adopted_file_equals_the_original_at_two_batch_sizes(
    case: str,
    sources: dict[str, Source],
    labels: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = sources[case]
    with caplog.at_level(logging.INFO, logger="export"):
        result = _adopt(source, tmp_path, labels)
    if case == "dynamo":  # its batch is free only once the Reshape target is rewritten
        assert "batch: Reshape 'node_view' target [1, 512] -> [-1, 512]" in caplog.text
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input", ["batch", 3, SIZE, SIZE])
    ]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("logits", ["batch", CLASSES]),
        ("embedding", ["batch", 512]),
    ]
    for n in (1, 3):
        x = _images(n, seed=n)
        logits, embedding = session.run(None, {"input": x})
        original = _original(source, x)
        if case == "softmax":  # the file's output is probabilities; ours, their logits
            _close(softmax(logits.copy()), original, 1e-6)
        else:
            _close(logits, original, 1e-6)
        ref_logits, features = _pytorch(source, x)
        _close(logits, ref_logits, 1e-4)
        _close(embedding, features, 1e-4)
    assert not (tmp_path / "adopted" / "config.json").exists()
    engine = Engine(result.path, providers=("cpu",))
    assert (engine.num_classes, engine.embedding_dim) == (CLASSES, 512)
    assert result.card.verification is not None
    assert result.card.verification.batch_sizes == (1, 8)
    assert result.card.verification.max_rel_diff_logits <= 1e-6


def test_cli_writes_the_card(
    sources: dict[str, Source],
    labels: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = sources["fixed"]
    with caplog.at_level(logging.INFO, logger="export"):
        code = main([
            str(source.path), "--labels", str(labels), *NORMALIZE, "--interpolation", "bicubic",
            "--out", str(tmp_path), "--name", "r18", "--version", "4",
        ])  # fmt: skip
    assert code == 0
    path = tmp_path / "r18" / "4" / "model.onnx"
    assert capsys.readouterr().out.strip() == f"{path}  ({CLASSES} classes, version 4)"
    assert "--resize not given: 73, ImageNet's 256/224 of the 64-pixel crop" in caplog.text
    card = ModelCard.from_metadata_props({p.key: p.value for p in onnx.load(path).metadata_props})
    assert card.labels == tuple(f"class {i}" for i in range(CLASSES))
    pre = card.preprocessing
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (73, SIZE, MEAN, STD)
    assert (pre.interpolation, pre.channel_order) == ("bicubic", "RGB")
    p = card.provenance
    assert (p.source, p.arch, p.weights, p.trained) == (
        "onnx",
        "resnet18_fixed",
        source.path.name,
        True,
    )
    assert p.checkpoint_sha256 == hashlib.sha256(source.path.read_bytes()).hexdigest()
    assert p.library == f"pytorch {torch.__version__.split('+')[0]}"
    assert p.opset == onnx.load(source.path).opset_import[0].version
    assert p.exporter_version.startswith(f"export.adopt (onnx {onnx.__version__}")
    assert p.torch_version is None
    v = card.verification
    assert v is not None and (v.inputs, v.batch_sizes, v.tolerance) == ("random", (1, 8), 1e-4)
    assert v.top1_agreement == 1.0 and v.max_rel_diff_embedding <= 1e-6


def test_softmax_is_dropped_and_said(
    sources: dict[str, Source], labels: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="export"):
        result = _adopt(sources["softmax"], tmp_path, labels)
    assert (
        "output 'prob' is a Softmax: its input '/0/fc/Gemm_output_0' is the logits" in caplog.text
    )
    assert "Softmax dropped" in result.card.provenance.exporter_version
    assert [n.op_type for n in onnx.load(result.path).graph.node].count("Softmax") == 0


def test_graph_fixed_at_batch_one_is_served_one_at_a_time(
    sources: dict[str, Source], labels: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = sources["batch_one"]
    (tmp_path / "adopted").mkdir()
    (tmp_path / "adopted" / "config.json").write_text('{"max_delay_ms": 3}')
    with caplog.at_level(logging.WARNING, logger="export"):
        result = _adopt(source, tmp_path, labels)
    assert "the graph runs only at batch 1 (the adopted graph fails at batch 8" in caplog.text
    config = json.loads((tmp_path / "adopted" / "config.json").read_text())
    assert config == {"max_delay_ms": 3, "max_batch_size": 1}  # the user's setting kept
    assert scan(tmp_path)["adopted"].overrides.max_batch_size == 1
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
    assert result.card.verification is not None
    assert result.card.verification.batch_sizes == (1,)
    x = _images(1)
    outputs = Engine(result.path, providers=("cpu",)).run(x)
    ref_logits, features = _pytorch(source, x)
    _close(outputs["logits"], ref_logits, 1e-4)
    _close(outputs["embedding"], features, 1e-4)


def test_verify_images_and_the_engine_with_the_service_preprocessing(
    sources: dict[str, Source], labels: Path, tmp_path: Path, cifar_jpegs: Path
) -> None:
    source = sources["dynamic"]
    result = _adopt(source, tmp_path, labels, verify_images=cifar_jpegs, batch_sizes=(2, 5))
    assert result.card.verification is not None
    assert (result.card.verification.inputs, result.card.verification.batch_sizes) == (
        str(cifar_jpegs),
        (2, 5),
    )
    engine = Engine(result.path, providers=("cpu",))
    preprocess = Preprocessor(engine.card.preprocessing, max_pixels=1 << 24)
    rows = [preprocess(p.read_bytes()) for p in sorted(cifar_jpegs.glob("*.jpg"))[:4]]
    outputs = engine.run_rows(rows)
    ref_logits, features = _pytorch(source, np.stack(rows))
    _close(outputs["logits"], ref_logits, 1e-4)
    _close(outputs["embedding"], features, 1e-4)
    assert outputs["ranking"][:, 0].tolist() == ref_logits.argmax(1).tolist()


def test_adoption_runs_without_torch() -> None:
    """export.adopt and what it imports stay torch-free (it runs where PyTorch is absent)."""
    code = "import sys, export.adopt; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
