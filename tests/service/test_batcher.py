"""The dynamic batcher, gated by events: each engine run blocks until the test releases it.

The gated run function stands in for the engine only to control *when* a batch finishes;
the last tests run the batcher on the real ONNX Runtime engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from service.batcher import Batcher, Outputs
from service.engine import Engine
from service.errors import InferenceFailed, Overloaded, ShuttingDown
from service.metrics import Metrics

TIMEOUT = 10.0


class GatedRun:
    """A batch function that reports each batch and waits for the gate before returning."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.gate = threading.Event()
        self.entered: asyncio.Queue[list[float]] = asyncio.Queue()
        self.batches: list[list[float]] = []
        self.drop_last_row = False

    def __call__(self, rows: Sequence[np.ndarray]) -> Outputs:
        values = [float(row[0]) for row in rows]
        self.batches.append(values)
        self.loop.call_soon_threadsafe(self.entered.put_nowait, values)
        if not self.gate.wait(TIMEOUT):
            raise RuntimeError("the test never opened the gate")
        if any(v < 0 for v in values):
            raise ValueError("negative input")
        doubled = np.stack(rows) * 2
        return {"double": doubled[:-1] if self.drop_last_row else doubled}

    async def next_batch(self) -> list[float]:
        return await asyncio.wait_for(self.entered.get(), TIMEOUT)


def row(value: float) -> np.ndarray:
    return np.full(3, value, dtype=np.float32)


async def results(futures: Sequence[asyncio.Future[Outputs]]) -> list[float]:
    done = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    return [float(out["double"][0]) for out in done]


@pytest.fixture
async def gated() -> AsyncIterator[GatedRun]:
    run = GatedRun(asyncio.get_running_loop())
    yield run
    run.gate.set()  # never leave an executor thread blocked


def make(run: GatedRun, **kw: float) -> Batcher:
    options = {"max_batch_size": 4, "max_delay_s": 0.0, "max_queue_size": 100} | kw
    batcher = Batcher(run, name="test", **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_batch_forms_by_size_before_the_deadline(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4, max_delay_s=60.0)
    gated.gate.set()
    futures = [f for v in (1, 2, 3, 4) for f in batcher.submit([row(v)])]
    assert await results(futures) == [2.0, 4.0, 6.0, 8.0]
    assert gated.batches == [[1.0, 2.0, 3.0, 4.0]]  # full at 4: no 60 s wait
    await batcher.stop()


async def test_batch_forms_by_deadline_from_first_arrival(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=8, max_delay_s=0.05)
    gated.gate.set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    futures = batcher.submit([row(1)]) + batcher.submit([row(2)]) + batcher.submit([row(3)])
    assert await results(futures) == [2.0, 4.0, 6.0]
    assert gated.batches == [[1.0, 2.0, 3.0]]
    assert loop.time() - start >= 0.05  # it waited for the deadline, not for a full batch
    await batcher.stop()


async def test_items_queued_while_the_engine_is_busy_form_the_next_batch(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4, max_delay_s=0.0)
    first = batcher.submit([row(1)])
    assert await gated.next_batch() == [1.0]  # running, blocked on the gate
    queued = [f for v in (2, 3, 4, 5, 6) for f in batcher.submit([row(v)])]
    assert batcher.depth == 5
    gated.gate.set()
    assert await results(first + queued) == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert gated.batches == [[1.0], [2.0, 3.0, 4.0, 5.0], [6.0]]


async def test_a_lone_row_runs_at_once_in_the_calling_thread(gated: GatedRun) -> None:
    metrics = Metrics()
    batcher = make(gated)
    batcher._observer = metrics.batch_observer("test", 1)
    gated.gate.set()
    with batcher.decoding():  # only the caller's own request is being decoded
        outputs = await asyncio.to_thread(batcher.run_alone, row(3))
    assert outputs is not None and float(outputs["double"][0]) == 6.0
    assert gated.batches == [[3.0]] and batcher.depth == 0
    assert (
        metrics.registry.get_sample_value(
            "resnet_serve_batch_size_count", {"model": "test", "version": "1"}
        )
        == 1.0
    )
    await batcher.stop()


async def test_a_row_is_not_alone_when_others_are_pending(gated: GatedRun) -> None:
    batcher = make(gated)
    with batcher.decoding(), batcher.decoding():  # another request is being decoded too
        assert batcher.run_alone(row(1)) is None  # so this one may join a batch
    with batcher.decoding():
        running = batcher.submit([row(1)])
        assert await gated.next_batch() == [1.0]  # a batch is running (and holds the engine)
        assert batcher.run_alone(row(2)) is None
        queued = batcher.submit([row(3)])  # and one is queued
        assert batcher.run_alone(row(4)) is None
    gated.gate.set()
    assert await results(running + queued) == [2.0, 6.0]
    assert gated.batches == [[1.0], [3.0]]
    assert batcher.run_alone(row(7), expires=time.monotonic() - 1) is None  # deadline passed
    delayed = make(gated, max_delay_s=0.01)  # a configured delay always takes the queue
    assert delayed.run_alone(row(5)) is None
    await delayed.stop()
    await batcher.stop()
    assert batcher.run_alone(row(6)) is None  # stopped


async def test_a_batch_waits_for_a_lone_run_holding_the_engine(gated: GatedRun) -> None:
    batcher = make(gated)
    lone = asyncio.ensure_future(asyncio.to_thread(batcher.run_alone, row(1)))
    assert await gated.next_batch() == [1.0]  # running alone, blocked on the gate
    queued = batcher.submit([row(2)])
    await asyncio.sleep(0.05)
    assert gated.batches == [[1.0]]  # the batch did not start beside it
    gated.gate.set()
    outputs = await asyncio.wait_for(lone, TIMEOUT)
    assert outputs is not None and float(outputs["double"][0]) == 2.0
    assert await results(queued) == [4.0]
    assert gated.batches == [[1.0], [2.0]]
    await batcher.stop()


async def test_a_lone_run_that_fails_raises_inference_failed(gated: GatedRun) -> None:
    batcher = make(gated)
    gated.gate.set()
    with pytest.raises(InferenceFailed, match="batch of 1: negative input"):
        await asyncio.to_thread(batcher.run_alone, row(-1))
    assert await results(batcher.submit([row(2)])) == [4.0]  # the engine is free again
    await batcher.stop()


async def test_request_with_several_images_spans_batches_in_order(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=2)
    gated.gate.set()
    futures = batcher.submit([row(v) for v in (1, 2, 3, 4, 5)])
    assert await results(futures) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert gated.batches == [[1.0, 2.0], [3.0, 4.0], [5.0]]
    await batcher.stop()


async def test_engine_error_fails_only_its_batch(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4)
    first = batcher.submit([row(1)])
    await gated.next_batch()
    bad = batcher.submit([row(-1)]) + batcher.submit([row(2)])  # one batch: [-1, 2]
    gated.gate.set()
    assert await results(first) == [2.0]
    for future in bad:
        with pytest.raises(InferenceFailed, match="negative input"):
            await asyncio.wait_for(future, TIMEOUT)
    assert await results(batcher.submit([row(3)])) == [6.0]  # the next batch is served
    assert gated.batches == [[1.0], [-1.0, 2.0], [3.0]]
    await batcher.stop()


async def test_cancelled_items_are_dropped_before_running(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4)
    first = batcher.submit([row(1)])
    await gated.next_batch()
    gone, kept = batcher.submit([row(2)]) + batcher.submit([row(3)])
    gone.cancel()  # the client went away while queued
    gated.gate.set()
    assert await results([*first, kept]) == [2.0, 6.0]
    assert gated.batches == [[1.0], [3.0]]
    assert gone.cancelled()
    await batcher.stop()


async def test_cancelled_items_do_not_count_toward_a_full_batch(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=3, max_delay_s=TIMEOUT)
    gated.gate.set()
    first, gone, second = (
        batcher.submit([row(1)]) + batcher.submit([row(2)]) + batcher.submit([row(3)])
    )
    gone.cancel()
    for _ in range(3):
        await asyncio.sleep(0)  # yield: a batch counting the cancelled item would start now
    third = batcher.submit([row(4)])
    assert await results([first, second, *third]) == [2.0, 6.0, 8.0]
    assert gated.batches == [[1.0, 3.0, 4.0]]
    await batcher.stop()


async def test_output_row_count_mismatch_fails_the_batch_clearly(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=2, max_delay_s=60.0)
    gated.drop_last_row = True
    gated.gate.set()
    futures = batcher.submit([row(1), row(2)])
    for future in futures:
        with pytest.raises(InferenceFailed, match=r"returned 1 rows of 'double' for a batch of 2"):
            await asyncio.wait_for(future, TIMEOUT)
    await batcher.stop()


async def test_queue_bound_rejects_whole_requests(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4, max_queue_size=3)
    first = batcher.submit([row(1)])
    await gated.next_batch()  # taken off the queue: 3 free places
    queued = batcher.submit([row(2), row(3)])
    with pytest.raises(Overloaded, match="2 images queued"):
        batcher.submit([row(4), row(5)])  # only one place left: nothing is queued
    assert batcher.depth == 2
    queued += batcher.submit([row(6)])
    gated.gate.set()
    assert await results(first + queued) == [2.0, 4.0, 6.0, 12.0]
    await batcher.stop()


async def test_stop_finishes_queued_work_then_refuses(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4)
    futures = batcher.submit([row(1)])
    await gated.next_batch()
    futures += batcher.submit([row(2), row(3)])
    stopping = asyncio.create_task(batcher.stop(timeout_s=TIMEOUT))
    await asyncio.sleep(0)  # let stop() close the door
    with pytest.raises(ShuttingDown):
        batcher.submit([row(4)])
    gated.gate.set()
    assert await results(futures) == [2.0, 4.0, 6.0]
    await asyncio.wait_for(stopping, TIMEOUT)


async def test_stop_after_drain_timeout_resolves_every_future(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=1)
    running = batcher.submit([row(1)])
    await gated.next_batch()
    queued = batcher.submit([row(2)])
    await batcher.stop(timeout_s=0.05)  # the gate stays closed: nothing can finish
    for future in running + queued:
        assert future.done()
        with pytest.raises(ShuttingDown):
            future.result()


async def test_real_engine_batches_equal_one_engine_run(cifar_model_file: object) -> None:
    engine = Engine(cifar_model_file)  # type: ignore[arg-type]
    metrics = Metrics()
    batcher = Batcher(
        engine.run_rows,
        name="cifar",
        max_batch_size=3,
        max_delay_s=0.0,
        max_queue_size=100,
        observer=metrics.batch_observer("cifar", 1),
    )
    batcher.start()
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((7, 3, 32, 32), dtype=np.float32)
    outputs = await asyncio.wait_for(asyncio.gather(*batcher.submit(list(batch))), TIMEOUT)
    expected = engine.run(batch)
    for name in ("logits", "probabilities", "embedding"):
        got = np.stack([out[name] for out in outputs])
        np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-5)
    labels = {"model": "cifar", "version": "1"}
    assert metrics.registry.get_sample_value("resnet_serve_batch_size_count", labels) == 3
    assert metrics.registry.get_sample_value("resnet_serve_batch_size_sum", labels) == 7
    await batcher.stop()


async def test_instances_run_that_many_batches_at_once(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=4, instances=2)
    first = batcher.submit([row(1)])
    assert await gated.next_batch() == [1.0]  # instance 1 runs, blocked on the gate
    second = batcher.submit([row(2)])
    assert await gated.next_batch() == [2.0]  # instance 2 does not wait for it
    queued = [f for v in (3, 4) for f in batcher.submit([row(v)])]
    assert batcher.depth == 2  # both instances busy: these wait, and batch together
    gated.gate.set()
    assert await results(first + second + queued) == [2.0, 4.0, 6.0, 8.0]
    assert gated.batches == [[1.0], [2.0], [3.0, 4.0]]
    await batcher.stop()


async def test_stop_resolves_every_future_of_every_instance(gated: GatedRun) -> None:
    batcher = make(gated, max_batch_size=1, instances=2)
    futures = [f for v in (1, 2, 3) for f in batcher.submit([row(v)])]
    assert sorted([await gated.next_batch(), await gated.next_batch()]) == [[1.0], [2.0]]
    await batcher.stop(timeout_s=0.05)  # both runs blocked past the drain timeout
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(outcome, ShuttingDown) for outcome in outcomes)


async def test_batches_count_the_front_ends_their_rows_came_from(gated: GatedRun) -> None:
    metrics = Metrics()
    batcher = make(gated, max_batch_size=4, max_delay_s=60.0)
    batcher._observer = metrics.batch_observer("test", 1)
    gated.gate.set()
    futures = [f for source in (11, 12, 11, 12) for f in batcher.submit([row(1)], source=source)]
    await results(futures)
    labels = {"model": "test", "version": "1"}
    assert metrics.registry.get_sample_value("resnet_serve_batch_sources_sum", labels) == 2.0
    await batcher.stop()
