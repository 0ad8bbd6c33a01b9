"""Bad input to ``python -m export FILE.onnx``: one line on stderr, exit status 2, nothing written.

The graphs are built here with onnx.helper (an 8x8 Conv, pool, Flatten, Gemm classifier),
each case differing from the adoptable one in one thing; no PyTorch is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main
from export.adopt import adopt_onnx
from service.engine import Engine

CLASSES = 7
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NORMALIZE = ["--mean", *map(str, MEAN), "--std", *map(str, STD)]


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(CLASSES)))
    return path


def _tiny(path: Path, kind: str = "ok", *, metadata: dict[str, str] | None = None) -> Path:
    """An 8x8 classifier built with onnx.helper: Conv, pool, Flatten, Gemm (or a broken variant)."""
    rng = np.random.default_rng(0)
    width = CLASSES if kind == "no_fc" else 4
    weights = {
        "w": rng.standard_normal((width, 3, 1, 1)).astype(np.float32),
        "fc_w": rng.standard_normal((CLASSES, 4)).astype(np.float32),
        "fc_b": rng.standard_normal(CLASSES).astype(np.float32),
    }
    nhwc = kind == "nhwc"
    x = helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 8, 8, 3] if nhwc else [1, 3, 8, 8]
    )
    nodes = [helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2])] if nhwc else []
    nodes += [
        helper.make_node("Conv", ["nchw" if nhwc else "x", "w"], ["conv"]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
    ]
    if kind == "no_fc":
        outputs = [("flat", [1, CLASSES])]
    elif kind == "matmul":  # how TensorFlow converters write a dense layer
        weights["fc_w"] = weights["fc_w"].T.copy()
        nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["mm"]))
        nodes.append(helper.make_node("Add", ["mm", "fc_b"], ["out"]))
        outputs = [("out", [1, CLASSES])]
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["out"], transB=1))
        outputs = [("conv", [1, 4, 8, 8])] if kind == "spatial" else [("out", [1, CLASSES])]
    if kind == "two_outputs":
        nodes.append(helper.make_node("Relu", ["out"], ["relu"]))
        outputs.append(("relu", [1, CLASSES]))
    inputs = [x]
    if kind == "listed":  # weights listed as inputs too, as keep_initializers_as_inputs does
        inputs += [
            helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in weights.items()
        ]
    if kind == "two_inputs":
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(
        nodes, "tiny", inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, metadata or {})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["ok", "matmul", "listed"])
def test_tiny_graph_is_adoptable(kind: str, labels: Path, tmp_path: Path) -> None:
    """The bad-input cases below differ from the "ok" graph in one thing each."""
    path = _tiny(tmp_path / "tiny.onnx", kind)
    result = adopt_onnx(
        path, out=tmp_path, name="tiny", labels=labels, mean=MEAN, std=STD, resize=8
    )
    assert result.card.provenance.arch == "tiny" and result.card.preprocessing.crop == 8
    engine = Engine(result.path, providers=("cpu",))
    assert engine.session.get_inputs()[0].shape == ["batch", 3, 8, 8]
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8), dtype=np.float32)
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    pooled = np.einsum("oc,nchw->no", w["w"][:, :, 0, 0], x) / 64  # 1x1 conv, global mean
    fc = w["fc_w"].T if kind == "matmul" else w["fc_w"]
    outputs = engine.run(x)
    np.testing.assert_allclose(outputs["embedding"], pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["logits"], pooled @ fc.T + w["fc_b"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_onnx", "bad.onnx is not an ONNX model"),
        ("missing", "cannot read"),
        ("two_inputs", "the graph has 2 inputs ('x' float32 [1, 3, 8, 8]; 'scale' float32 [1])"),
        ("nhwc", "input 'x' float32 [1, 8, 8, 3] has an NHWC (channels-last) input"),
        ("spatial", "no output looks like logits [N, classes]; outputs: 'conv' float32 [1, 4, 8,"),
        ("two_outputs", "cannot tell which output is the logits: outputs 'out' float32 [1, 7]; "
         "'relu' float32 [1, 7]; expected exactly one float32 [N, 7]"),
        ("no_fc", "the logits 'flat' come from a Flatten node, not from a final fully connected"),
        ("labels", "the logits have 7 columns but"),
        ("input_size", "--input-size 224 differs from the graph's input size 8"),
        ("carded", "already a resnet-serve model; copy it to"),
        ("no_labels", "--labels required to adopt an ONNX file"),
        ("no_std", "--std required to adopt an ONNX file"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(
    case: str, message: str, labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.onnx"
    flags = ["--labels", str(labels), *NORMALIZE, "--resize", "8"]
    if case == "not_onnx":
        path.write_bytes(b"not an ONNX model at all\n")
    elif case in ("two_inputs", "nhwc", "spatial", "two_outputs", "no_fc"):
        _tiny(path, case)
    elif case != "missing":
        _tiny(path, metadata={"format": "resnet-serve/1"} if case == "carded" else None)
    if case == "labels":
        short = tmp_path / "five.txt"
        short.write_text("a\nb\nc\nd\ne\n")
        flags[1] = str(short)
    elif case == "input_size":
        flags += ["--input-size", "224"]
    elif case == "no_labels":
        flags = flags[2:]
    elif case == "no_std":
        flags = flags[:6] + flags[10:]
    code = main([str(path), *flags, "--out", str(tmp_path / "models"), "--name", "bad"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    if case == "labels":
        assert f"{short} has 5 labels" in err
    assert not (tmp_path / "models" / "bad").exists()
