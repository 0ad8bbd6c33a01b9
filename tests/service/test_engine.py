"""The ONNX Runtime engine on a real exported model, and its contract checks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.labels import CIFAR10_CLASSES
from service.engine import (
    CPU,
    CUDA,
    Engine,
    ModelLoadError,
    ThreadSettings,
    provider_options,
    resolve_providers,
    softmax,
    warmup_sizes,
)
from service.postprocess import top_predictions

CIFAR_LABELS = CIFAR10_CLASSES


@pytest.fixture(scope="module")
def engine(cifar_model_file: Path) -> Engine:
    return Engine(cifar_model_file, threads=ThreadSettings(intra_op=1))


def test_reads_the_model_card_and_signature(engine: Engine, cifar_model_file: Path) -> None:
    assert engine.card.labels == CIFAR_LABELS
    assert (engine.num_classes, engine.embedding_dim, engine.input_size) == (10, 64, 32)
    assert engine.provider == CPU
    assert engine.sha256 == hashlib.sha256(cifar_model_file.read_bytes()).hexdigest()


def test_run_equals_onnxruntime_and_adds_softmax(engine: Engine, cifar_model_file: Path) -> None:
    batch = np.random.default_rng(1).standard_normal((5, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(cifar_model_file), providers=[CPU])
    logits, embedding = session.run(["logits", "embedding"], {"input": batch})
    out = engine.run(batch)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], embedding, rtol=1e-5, atol=1e-5)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"].sum(1), np.ones(5), atol=1e-6)


def test_ranking_orders_classes_by_probability(engine: Engine) -> None:
    batch = np.random.default_rng(3).standard_normal((6, 3, 32, 32), dtype=np.float32)
    out = engine.run(batch)
    ranking, probabilities = out["ranking"], out["probabilities"]
    assert ranking.shape == (6, 10)
    for row, order in zip(probabilities, ranking, strict=True):
        assert sorted(order.tolist()) == list(range(10))  # a permutation of the classes
        assert np.all(np.diff(row[order]) <= 0)  # most probable first
        for k in (1, 3, 10):  # the same answer as sorting the scores per request
            assert top_predictions(row, k, CIFAR_LABELS, order) == top_predictions(
                row, k, CIFAR_LABELS
            )


def test_top_predictions_break_ties_by_lower_index() -> None:
    scores = np.array([0.1, 0.3, 0.3, 0.2, 0.1], dtype=np.float32)
    labels = ["a", "b", "c", "d", "e"]
    assert [p["index"] for p in top_predictions(scores, 5, labels)] == [1, 2, 3, 0, 4]
    ranking = np.argsort(-scores, kind="stable")
    assert top_predictions(scores, 2, labels, ranking) == top_predictions(scores, 2, labels)


def test_run_rows_stacks_rows(engine: Engine) -> None:
    rows = list(np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32))
    np.testing.assert_allclose(
        engine.run_rows(rows)["logits"], engine.run(np.stack(rows))["logits"], atol=1e-5
    )
    assert engine.run_rows(rows[:1])["logits"].shape == (1, 10)


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]])


def test_warmup_sizes_cover_the_batch_bucket() -> None:
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(12) == [1, 2, 4, 8, 12]
    assert warmup_sizes(32) == [1, 2, 4, 8, 16, 32]


def test_warm_up_runs_every_size(engine: Engine) -> None:
    assert engine.warm_up([1, 4]) > 0.0


def test_provider_choice(caplog: pytest.LogCaptureFixture) -> None:
    # No GPU on this machine: the CUDA cases are decided from the provider list alone.
    assert resolve_providers(("auto",), [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers(("auto",), ["AzureExecutionProvider", CPU]) == [CPU]
    assert resolve_providers(("cpu",), [CUDA, CPU]) == [CPU]
    with caplog.at_level(logging.WARNING):
        assert resolve_providers(("cuda",), [CPU]) == [CPU]
    assert "['CUDAExecutionProvider'] are not available" in caplog.text


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelLoadError, match="is not a loadable ONNX model"):
        Engine(path)


def _tiny_model(path: Path, *, input_name: str, card: dict[str, str] | None) -> None:
    """A one-node ONNX graph (identity), with or without a model card."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (card or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def test_model_without_card(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "m.onnx", input_name="input", card=None)
    with pytest.raises(ModelLoadError, match="was this file written by `python -m export`"):
        Engine(tmp_path / "m.onnx")


def test_model_with_wrong_input_name(tmp_path: Path, engine: Engine) -> None:
    card = engine.card.to_metadata_props()
    _tiny_model(tmp_path / "m.onnx", input_name="pixels", card=card)
    with pytest.raises(ModelLoadError, match=r"expected one input 'input', got \['pixels'\]"):
        Engine(tmp_path / "m.onnx")


def test_model_missing_embedding_output(tmp_path: Path, engine: Engine) -> None:
    _tiny_model(tmp_path / "m.onnx", input_name="input", card=engine.card.to_metadata_props())
    with pytest.raises(ModelLoadError, match="output 'embedding' missing"):
        Engine(tmp_path / "m.onnx")


def test_provider_options_follow_the_providers_and_later_layers_win() -> None:
    service = {"cuda": {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}}
    model = {
        "CUDAExecutionProvider": {"device_id": 0},
        "tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_path": "/cache"},
    }
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(providers, service, model) == [
        {"trt_fp16_enable": "1", "trt_engine_cache_path": "/cache"},
        {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"},  # the model's device wins
        {},
    ]
    assert provider_options(["CPUExecutionProvider"]) == [{}]
