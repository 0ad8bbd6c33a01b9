"""Deadlines, the admission and body limits, and the GPU fallback, through the real app."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from inprocess import model_repo, png, serving

from service.batcher import Batcher, Outputs
from service.errors import DeadlineExceeded
from service.settings import SettingsError, load_settings

TIMEOUT = 10.0
without_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
    reason="these tests need an onnxruntime without CUDA (they prove the CPU fallback)",
)


def batch_metric(text: str, suffix: str, model: str) -> float:
    prefix = f'resnet_serve_batch_size_{suffix}{{model="{model}",version="1"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def test_expired_rows_are_dropped_before_the_engine_runs() -> None:
    """The engine is held on a gate so that rows queue behind it; one of them expires."""
    gate = threading.Event()
    batches: list[list[float]] = []

    def run(rows: Sequence[np.ndarray]) -> Outputs:
        batches.append([float(r[0]) for r in rows])
        gate.wait(TIMEOUT)
        return {"double": np.stack(rows) * 2}

    batcher = Batcher(run, name="t", max_batch_size=4, max_delay_s=0.0, max_queue_size=10)
    batcher.start()
    loop = asyncio.get_running_loop()
    running = batcher.submit([np.ones(2, np.float32)])
    while not batches:  # the first batch is in the engine
        await asyncio.sleep(0.001)
    expired = batcher.submit([np.full(2, 2, np.float32)], deadline=loop.time() - 1)
    live = batcher.submit([np.full(2, 3, np.float32)], deadline=loop.time() + 60)
    gate.set()
    done = await asyncio.wait_for(asyncio.gather(*running, *live), TIMEOUT)
    assert [float(out["double"][0]) for out in done] == [2.0, 6.0]
    with pytest.raises(DeadlineExceeded, match="dropped before running"):
        await expired[0]
    assert batches == [[1.0], [3.0]]  # the expired row never reached the engine
    await batcher.stop()


async def test_a_request_past_its_deadline_gets_504_and_never_runs(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    """Batches of 2 wait up to 10 s: a lone request asking for 0.3 s cannot make it."""
    repo = model_repo(tmp_path, cifar_model_file, max_batch_size=2, max_delay_ms=10_000)
    async with serving(repo) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        late = await client.post("/predict", content=png(), headers={"X-Request-Timeout": "0.3"})
        waited = loop.time() - start
        assert late.status_code == 504
        assert late.json()["error"] == {
            "code": "deadline_exceeded",
            "message": "the request ran out of time while waiting for the model (its deadline "
            "was 0.3 s after arrival; ask for up to the server's limit with the "
            "X-Request-Timeout header)",
        }
        assert 0.3 <= waited < 5
        pair = await asyncio.gather(
            client.post("/predict", content=png(color=(1, 2, 3))),
            client.post("/predict", content=png(color=(250, 250, 3))),
        )
        assert [r.status_code for r in pair] == [200, 200]
        metrics = (await client.get("/metrics")).text
    # One engine run, of the two live images: the expired one was dropped from the queue.
    assert batch_metric(metrics, "count", "cifar") == 1
    assert batch_metric(metrics, "sum", "cifar") == 2


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", ""])
async def test_a_bad_timeout_header_is_422(tmp_path: Path, value: str) -> None:
    async with serving(tmp_path, loaded=False) as client:
        response = await client.post(
            "/predict", content=png(), headers={"X-Request-Timeout": value}
        )
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "invalid_parameter",
        "message": "X-Request-Timeout must be a number of seconds > 0 (at most 30 are "
        f"granted), got {value!r}",
    }


async def test_timeouts_beyond_the_server_limit_are_capped_not_refused(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    async with serving(model_repo(tmp_path, cifar_model_file), request_timeout_s=5) as client:
        response = await client.post(
            "/predict", content=png(), headers={"X-Request-Timeout": "3600"}
        )
        assert response.status_code == 200


async def chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    """A body without Content-Length: httpx sends it chunked."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_streamed_bodies_over_the_limit_are_413(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    limit = 50_000
    multipart = (
        b"--XyZ\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n"
        b"Content-Type: image/png\r\n\r\n" + png() + b"\x00" * limit + b"\r\n--XyZ--\r\n"
    )
    raw = png() + b"\x00" * limit
    async with serving(model_repo(tmp_path, cifar_model_file), max_body_bytes=limit) as client:
        cases = [
            ("/predict", raw, {}),
            ("/predict", multipart, {"Content-Type": "multipart/form-data; boundary=XyZ"}),
            ("/embed", multipart, {"Content-Type": "multipart/form-data; boundary=XyZ"}),
            ("/v2/models/cifar/infer", raw, {}),
        ]
        for path, body, headers in cases:
            response = await client.post(path, content=chunks(body), headers=headers)
            assert response.status_code == 413, (path, headers)
            assert "content-length" not in response.request.headers  # streamed, chunked
            message = f"the request body is over {limit} bytes (max_body_bytes)"
            error = response.json()["error"]
            assert message in (error if isinstance(error, str) else error["message"]), path
        under = await client.post("/predict", content=chunks(png()))
        assert under.status_code == 200


async def test_a_slow_body_is_cut_at_the_deadline(tmp_path: Path, cifar_model_file: Path) -> None:
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield png()[:20]
        await never.wait()  # the client never sends the rest
        yield b""

    async with serving(model_repo(tmp_path, cifar_model_file)) as client:
        response = await client.post(
            "/predict", content=stalled(), headers={"X-Request-Timeout": "0.2"}
        )
    assert response.status_code == 504
    assert response.json()["error"]["message"].startswith(
        "the request ran out of time while its body was being received"
    )


async def test_admission_limit_answers_503_before_reading_the_body(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    """One request is admitted and holds its slot while its body trickles in (gated)."""
    started, release = asyncio.Event(), asyncio.Event()
    data = png()

    async def held_body() -> AsyncIterator[bytes]:
        yield data[:10]
        started.set()
        await release.wait()
        yield data[10:]

    async with serving(model_repo(tmp_path, cifar_model_file), max_concurrent_requests=1) as client:
        first = asyncio.create_task(client.post("/predict", content=held_body()))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        refused = await client.post("/predict", content=data)
        health = await client.get("/healthz")  # GETs are not counted against the limit
        release.set()
        admitted = await asyncio.wait_for(first, TIMEOUT)
        after = await client.post("/predict", content=data)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == {
        "code": "overloaded",
        "message": "the service is already handling 1 requests (max_concurrent_requests); "
        "retry shortly",
    }
    assert health.status_code == 200
    assert (admitted.status_code, after.status_code) == (200, 200)
    assert admitted.json() == after.json()


def test_api_keys_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.__main__ import banner

    settings = load_settings(api_keys="s3cret-one,s3cret-two")
    assert [k.get_secret_value() for k in settings.api_keys] == ["s3cret-one", "s3cret-two"]
    assert "s3cret" not in banner(settings, set())
    assert "api_keys" in banner(settings, set())
    with pytest.raises(SettingsError) as caught:
        load_settings(api_keys="bad key,with space")
    assert "s3cret" not in str(caught.value) and "bad key" not in str(caught.value)
    assert "api_keys (RESNET_SERVE_API_KEYS) = (hidden)" in str(caught.value)


def test_require_gpu_with_cpu_providers_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"require_gpu is on but providers is 'cpu'"):
        load_settings(require_gpu="true", providers="cpu")


@without_cuda
def test_require_gpu_refuses_to_start_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real: this machine's onnxruntime has no CUDA provider."""
    from service.__main__ import main

    assert main(["--models", str(tmp_path), "--require-gpu", "true"]) == 2
    assert "require_gpu is on, but this onnxruntime build has no CUDA provider" in (
        capsys.readouterr().err
    )


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOCK: only the list of available providers claims CUDA (this machine has no GPU).

    ONNX Runtime itself is real: asked for CUDA, this CPU build falls back to CPU exactly as
    onnxruntime-gpu does on a machine whose GPU or CUDA libraries are unusable.
    """
    listed = ["CUDAExecutionProvider", *onnxruntime.get_available_providers()]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)


@without_cuda
@pytest.mark.usefixtures("cuda_listed")
def test_cuda_requested_but_unusable_falls_back_with_a_warning(
    cifar_model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine import Engine

    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # onnxruntime's own
        engine = Engine(cifar_model_file, providers=("auto",))
    assert engine.provider == "CPUExecutionProvider"
    assert engine.run(np.zeros((1, 3, 32, 32), np.float32))["logits"].shape == (1, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "CUDA requested but not usable (CUDA could not be initialised): running on CPU" in w
        for w in warnings
    ), warnings


@without_cuda
@pytest.mark.usefixtures("cuda_listed")
async def test_require_gpu_fails_the_model_with_the_reason(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        async with serving(model_repo(tmp_path, cifar_model_file), require_gpu=True) as client:
            ready = await client.get("/readyz")
            models = (await client.get("/models")).json()["models"]
            refused = await client.post("/predict", content=png())
    assert ready.status_code == 503
    assert ready.json()["models"] == {"cifar/1": "failed"}
    reason = models[0]["versions"][0]["reason"]
    assert reason.startswith("failed to load: ") and reason.endswith(
        "require_gpu is on, but CUDA could not be initialised; the session runs on "
        "CPUExecutionProvider"
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_not_ready"
