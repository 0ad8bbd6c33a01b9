"""/predict and /embed through HTTP equal ONNX Runtime on torchvision-preprocessed tensors."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from e2e_server import Server

from service.metadata import ModelCard, Preprocessing

# Images the service decodes at full size for a 32-pixel model (JPEG draft mode starts
# at twice the resize, 64 pixels): for these it must equal torchvision exactly.
FULL_DECODE = ("small_48x40.jpg", "portrait_90x120.png", "gray_64x48.png")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png"}

Reference = Callable[[bytes, Preprocessing], np.ndarray]


@pytest.fixture(scope="module")
def session(cifar_model_file: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(cifar_model_file), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def card(session: ort.InferenceSession) -> ModelCard:
    return ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)


@pytest.fixture(scope="module")
def exact_images(test_images: dict[str, bytes]) -> dict[str, bytes]:
    """The real 32x32 CIFAR JPEGs plus the generated files that are not draft-decoded."""
    return {k: v for k, v in test_images.items() if k.startswith("cifar_") or k in FULL_DECODE}


def expected_outputs(
    images: list[bytes], session: ort.InferenceSession, card: ModelCard, reference: Reference
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities, embeddings) from ORT on torchvision-preprocessed tensors."""
    batch = np.stack([reference(data, card.preprocessing) for data in images])
    logits, embedding = session.run(["logits", "embedding"], {"input": batch})
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), embedding


def check_predictions(result: dict, probs: np.ndarray, labels: tuple[str, ...]) -> None:
    predictions = result["predictions"]
    assert len(predictions) == len(labels)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    for p in predictions:
        assert p["label"] == labels[p["index"]]
        assert p["score"] == pytest.approx(float(probs[p["index"]]), abs=1e-5)


def test_predict_raw_body_equals_onnxruntime_on_torchvision(
    server: Server,
    exact_images: dict[str, bytes],
    session: ort.InferenceSession,
    card: ModelCard,
    torchvision_eval: Reference,
) -> None:
    names = sorted(exact_images)
    probs, _ = expected_outputs([exact_images[n] for n in names], session, card, torchvision_eval)
    with server.client() as client:
        for name, expected in zip(names, probs, strict=True):
            response = client.post(
                "/predict",
                params={"top_k": 10},
                content=exact_images[name],
                headers={"Content-Type": CONTENT_TYPES[name.rsplit(".", 1)[1]]},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["model"], body["version"]) == ("cifar10-resnet20", 1)
            assert len(body["results"]) == 1
            check_predictions(body["results"][0], expected, card.labels)


def test_predict_default_top_k_is_five_best_first(server: Server, exact_images: dict) -> None:
    data = exact_images["portrait_90x120.png"]
    with server.client() as client:
        five = client.post("/predict", content=data).json()["results"][0]["predictions"]
        ten = client.post("/predict?top_k=10", content=data).json()["results"][0]["predictions"]
    assert len(five) == 5
    assert five == ten[:5]


def test_multipart_with_several_files_keeps_request_order(
    server: Server,
    exact_images: dict[str, bytes],
    session: ort.InferenceSession,
    card: ModelCard,
    torchvision_eval: Reference,
) -> None:
    names = [
        "gray_64x48.png",
        *sorted(n for n in exact_images if n.startswith("cifar_")),
        "small_48x40.jpg",
    ]
    probs, _ = expected_outputs([exact_images[n] for n in names], session, card, torchvision_eval)
    files = [("file", (n, exact_images[n], CONTENT_TYPES[n.rsplit(".", 1)[1]])) for n in names]
    with server.client() as client:
        response = client.post("/predict?top_k=10", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(names)
    for result, expected in zip(results, probs, strict=True):
        check_predictions(result, expected, card.labels)


def test_embed_equals_the_embedding_output(
    server: Server,
    exact_images: dict[str, bytes],
    session: ort.InferenceSession,
    card: ModelCard,
    torchvision_eval: Reference,
) -> None:
    names = ["portrait_90x120.png", "small_48x40.jpg"]
    _, expected = expected_outputs(
        [exact_images[n] for n in names], session, card, torchvision_eval
    )
    files = [("file", (n, exact_images[n])) for n in names]
    with server.client() as client:
        body = client.post("/embed", files=files).json()
        normalized = client.post("/embed?normalize=true", files=files).json()
    assert (body["model"], body["version"], body["dim"]) == ("cifar10-resnet20", 1, 64)
    got = np.array([r["embedding"] for r in body["results"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    unit = np.array([r["embedding"] for r in normalized["results"]], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(
        unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
    )


def test_embed_as_npy(server: Server, exact_images: dict[str, bytes]) -> None:
    files = [("files", (n, exact_images[n])) for n in ("gray_64x48.png", "small_48x40.jpg")]
    with server.client() as client:
        as_json = client.post("/embed", files=files).json()
        response = client.post("/embed", files=files, headers={"Accept": "application/x-npy"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (2, 64)
    np.testing.assert_array_equal(array, [r["embedding"] for r in as_json["results"]])


def test_large_jpeg_is_classified_close_to_the_full_decode(
    server: Server,
    photo_like: Callable,
    session: ort.InferenceSession,
    card: ModelCard,
    torchvision_eval: Reference,
) -> None:
    """A 1600x1200 JPEG is DCT-scaled (1/8) before the resize: close, not bit-equal."""
    buffer = io.BytesIO()
    photo_like(1600, 1200, 11).save(buffer, "JPEG", quality=90)
    probs, _ = expected_outputs([buffer.getvalue()], session, card, torchvision_eval)
    with server.client() as client:
        response = client.post("/predict?top_k=10", content=buffer.getvalue())
    got = {p["index"]: p["score"] for p in response.json()["results"][0]["predictions"]}
    np.testing.assert_allclose([got[i] for i in range(10)], probs[0], atol=0.02)
