"""``python -m export.quantize`` on the shipped ResNet-20: INT8 and FP16 variants, and bad input.

The variants are made from the real trained model and measured on the repository's 50
fixture JPEGs (an ImageFolder of CIFAR-10 classes), so the agreement bounds are about a
model whose answers mean something.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.quantize import main, quantize_model
from export.repository import ExportResult
from service.engine import Engine
from service.metadata import INPUT_NAME, ModelCard

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "cifar10-resnet20" / "1" / "model.onnx"
FIXTURES = REPO / "tests" / "fixtures" / "cifar10-val"


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("int8")
    return quantize_model(
        SHIPPED, precision="int8", out=out, name="r20-int8", calibration=FIXTURES,
        count=50, eval_dir=FIXTURES, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fp16(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("fp16")
    return quantize_model(
        SHIPPED.parent, precision="fp16", out=out, name="r20-fp16", eval_dir=FIXTURES,
        progress=False,
    )  # fmt: skip


def _card(path: Path) -> ModelCard:
    return ModelCard.from_metadata_props(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    )


def test_int8_keeps_the_contract_and_records_how_it_was_made(int8: ExportResult) -> None:
    source, card = _card(SHIPPED), _card(int8.path)
    assert card.labels == source.labels and card.preprocessing == source.preprocessing
    assert card.provenance == source.provenance and card.precision == "int8"
    q = card.quantization
    assert q is not None and q.precision == "int8"
    assert q.source_sha256 == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert (
        q.calibration_images == 50
        and q.calibration_sha256 is not None
        and len(q.calibration_sha256) == 64
    )
    assert q.format == "QDQ, per-channel int8 weights (7-bit range), uint8 activations (U8S8)"
    assert q.reduce_range is True and q.onnxruntime_version == ort.__version__
    a = q.agreement
    assert (a.on, a.images) == ("--eval cifar10-val", 50)
    assert a.top1_agreement >= 0.94  # 47 of 50 at least
    assert a.source_accuracy == pytest.approx(0.96) and a.accuracy is not None
    assert abs(a.accuracy - a.source_accuracy) <= 0.04
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_variants_run_in_the_engine_like_the_source(int8: ExportResult, fp16: ExportResult) -> None:
    source = Engine(SHIPPED)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((4, 3, 32, 32), dtype=np.float32)
    expected = source.run(batch)
    for result, logit_bound in ((int8, 1.5), (fp16, 0.05)):
        engine = Engine(result.path)
        assert (engine.num_classes, engine.embedding_dim) == (10, 64)
        got = engine.run(batch)
        for name in ("logits", "embedding"):
            assert got[name].dtype == np.float32 and got[name].shape == expected[name].shape
        assert np.abs(got["logits"] - expected["logits"]).max() < logit_bound


def test_fp16_is_float16_inside_and_float32_outside(fp16: ExportResult) -> None:
    session = ort.InferenceSession(str(fp16.path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    weights = onnx.load(str(fp16.path)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    card = _card(fp16.path)
    assert card.precision == "fp16" and card.quantization is not None
    assert card.quantization.agreement.top1_agreement >= 0.98
    assert card.quantization.calibration_images is None


def test_without_eval_the_agreement_uses_held_back_images(tmp_path: Path) -> None:
    result = quantize_model(
        SHIPPED, precision="int8", out=tmp_path, name="m", calibration=FIXTURES, count=30,
        held_back=20, progress=False,
    )  # fmt: skip
    q = result.card.quantization
    assert q is not None and q.calibration_images == 30
    assert (q.agreement.on, q.agreement.images) == ("calibration images held back", 20)
    assert q.agreement.accuracy is None


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err.strip()


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, int8: ExportResult, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "repo"), "--name", "m"]
    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(SHIPPED))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    assert "has no resnet-serve model card" in _fails(
        [str(plain), "--precision", "fp16", *out], capsys
    )

    message = _fails([str(int8.path), "--precision", "fp16", *out], capsys)
    assert message.startswith(
        f"error: {int8.path} is already a int8 variant; quantize its fp32 source"
    )

    assert _fails([str(SHIPPED), "--precision", "int8", *out], capsys) == (
        "error: --precision int8 needs --calibration DIR: images like those served"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "holds no image files" in _fails(
        [str(SHIPPED), "--precision", "int8", "--calibration", str(empty), *out], capsys
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(20):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    shutil.copy(FIXTURES / "cat" / "0000.jpg", broken / "real.jpg")
    message = _fails(
        [str(SHIPPED), "--precision", "int8", "--calibration", str(broken), "--count", "21", *out],
        capsys,
    )
    assert message == (
        f"error: --calibration {broken}: only 1 of 21 images could be read (20 skipped); "
        "at least 16 needed"
    )
    assert not (tmp_path / "repo").exists()  # nothing written on any failure


def test_unknown_precision_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(SHIPPED), "--precision", "int4", "--out", "x", "--name", "m"])
    assert info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_below_the_agreement_bound_nothing_is_written_unless_forced(tmp_path: Path) -> None:
    from export.errors import ExportError

    kwargs = dict(precision="int8", out=tmp_path, name="m", calibration=FIXTURES, count=50,
                  eval_dir=FIXTURES, progress=False)  # fmt: skip
    with pytest.raises(ExportError, match=r"under --min-agreement 101\.00%; nothing written"):
        quantize_model(SHIPPED, min_agreement=1.01, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "m").exists()
    forced = quantize_model(SHIPPED, min_agreement=1.01, force=True, **kwargs)  # type: ignore[arg-type]
    assert forced.path.exists()
    session = ort.InferenceSession(str(forced.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == INPUT_NAME


def test_quantize_needs_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, export.quantize; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
