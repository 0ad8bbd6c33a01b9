"""The pieces of ``export.transfer``: the split, the head's folding, the confusion summary,
and the graph surgery on the shipped model (real scikit-learn, real ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transfer_testlib import SHIPPED

from export import logistic_head
from export.errors import ExportError
from export.onnx_head import replace_head
from service.engine import softmax


def _blobs(k: int, n: int = 40, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` overlapping Gaussian classes in ``d`` dims, at an offset and scale of their own
    (so that the standardisation folded into the head matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (k, d))
    x = np.concatenate([rng.normal(c, 1.0, (n, d)) for c in centres]) * 3 + 5
    return x.astype(np.float32), np.repeat(np.arange(k), n)


def test_split_holds_out_a_fraction_of_every_class() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3] * 23)
    train, val = logistic_head.split(labels, 0.2, seed=0)
    assert np.bincount(labels[val]).tolist() == [2, 1, 1, 5]  # round(0.2 n), at least 1
    assert sorted([*train, *val]) == list(range(len(labels)))
    again = logistic_head.split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], val) and np.array_equal(again[0], train)
    assert not np.array_equal(logistic_head.split(labels, 0.2, seed=1)[1], val)
    assert np.bincount(labels[logistic_head.split(labels, 0.5, seed=0)[1]]).tolist() == [
        5, 2, 1, 12,
    ]  # fmt: skip


@pytest.mark.parametrize("k", [2, 4])
def test_the_folded_head_is_scikit_learns(k: int) -> None:
    x, y = _blobs(k)
    train, val = logistic_head.split(y, 0.25, seed=0)
    head = logistic_head.fit(x[train], y[train], x[val], y[val])
    assert [c for c, _ in head.scores] == list(logistic_head.C_GRID)
    assert max(a for _, a in head.scores) == dict(head.scores)[head.C]
    weight, bias = head.affine()
    assert weight.shape == (k, 6) and weight.dtype == bias.dtype == np.float32
    logits = head.logits(x)
    assert logits.shape == (len(x), k)
    np.testing.assert_allclose(x @ weight.T + bias, logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(softmax(logits.copy()), head.pipeline.predict_proba(x), atol=1e-6)
    assert np.array_equal(logits.argmax(1), head.pipeline.predict(x))


def test_confusion_summary() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 0, 0, 2, 2, 1])
    summary = logistic_head.confusion(truth, predicted, ("bird", "cat", "ship"))
    assert summary.accuracy == 0.5
    assert summary.per_class == (("bird", 2, 4), ("cat", 1, 3), ("ship", 2, 3))
    assert summary.confused == (
        ("cat", "bird", 2), ("bird", "cat", 1), ("bird", "ship", 1), ("ship", "cat", 1),
    )  # fmt: skip
    assert summary.lines(pairs=2) == [
        "  per class:",
        "    bird      2/4      50.00%",
        "    cat       1/3      33.33%",
        "    ship      2/3      66.67%",
        "  most confused (true -> predicted):",
        "    cat -> bird: 2",
        "    bird -> cat: 1",
    ]


def test_replace_head_on_a_graph_out_of_order() -> None:
    """Nodes listed backwards (ONNX Runtime sorts them; onnx.checker does not): the new
    graph is sorted again, computes the same embedding, and its logits are the new head."""
    proto = onnx.load(str(SHIPPED))
    nodes = list(proto.graph.node)[::-1]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(5, 64)).astype(np.float32), np.arange(5, dtype=np.float32)
    new, replaced = replace_head(proto, weight, bias)
    assert replaced == "Gemm"
    onnx.checker.check_model(new)
    assert [o.name for o in new.graph.output] == ["logits", "embedding"]
    dims = [d.dim_param or d.dim_value for d in new.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 5]
    assert "model.fc.inner.weight" not in {t.name for t in new.graph.initializer}
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(SHIPPED), providers=cpu).run(["embedding"], {"input": x})[0]
    logits, embedding = ort.InferenceSession(new.SerializeToString(), providers=cpu).run(
        ["logits", "embedding"], {"input": x}
    )
    assert np.array_equal(embedding, want)
    np.testing.assert_allclose(logits, embedding @ weight.T + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match=r"head weight \[5, 63\] does not fit \[K=5, D=64\]"):
        replace_head(proto, weight[:, :63], bias)
