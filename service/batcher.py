"""Dynamic batching: images from concurrent requests share one engine run.

Modelled on Ray Serve's ``batching.py``. Each preprocessed image is one pending item with
its own future. The loop waits (on an event, never a sleep) for the first item, then for
more until the batch is full or ``max_delay`` has passed since that first item arrived;
it drops items whose requests were cancelled, runs the batch once in its executor thread
and hands each item its own row of every output. Every future is resolved on every path:
engine errors fail that batch only, and shutdown fails whatever could not be drained.

Inputs are any float32 rows of the model's input shape, so decoded images (``/predict``)
and already-preprocessed tensors (the v2 protocol's ``input``) join the same queue. A
request with several images submits several items, which may span batches.

A lone image has a shorter path (:meth:`Batcher.run_alone`): when nothing is queued or
running and no other request is being decoded for this model, batching has nothing to add
to it, so the thread that decoded it runs it at once, saving two thread hand-offs (about
half a millisecond on a small VM). With ``max_delay_s`` > 0 every image takes the queue,
as configured.

``instances`` (Triton's ``instance_group`` count) is how many batches of one model may run
at once, each in its own engine thread: two 1-thread streams use two cores with less
synchronisation than one 2-thread stream, and on a GPU two batches overlap copies and
compute. A semaphore of that size bounds engine runs on either path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown

log = logging.getLogger(__name__)

Outputs = Mapping[str, np.ndarray]
"""Named outputs of a batch or of one row of it."""
RunBatch = Callable[[Sequence[np.ndarray]], Outputs]
"""Runs rows as one batch; every output has one row per input row, in order."""


class BatchObserver(Protocol):
    """Receives what the batcher does (metrics.py implements it)."""

    def batch_done(
        self, size: int, queue_waits: Sequence[float], run_seconds: float, sources: int
    ) -> None:
        """A batch ran: its size, each item's wait, the run's seconds and how many front
        ends (processes) its items came from."""

    def queue_depth(self, depth: int) -> None: ...


@dataclass(slots=True)
class Pending:
    """One image waiting for its batch."""

    row: np.ndarray
    future: asyncio.Future[Outputs]
    enqueued: float = field(default=0.0)
    deadline: float | None = None
    """Loop time after which nobody waits for the result: dropped, never run."""
    source: int = 0
    """Which front-end process sent it (0 in a single-process server)."""


def _set_result(future: asyncio.Future[Outputs], value: Outputs) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Outputs], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Batcher:
    """Groups single rows into batches for one model version. Use from one event loop."""

    def __init__(
        self,
        run: RunBatch,
        *,
        name: str,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        instances: int = 1,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0 or instances < 1:
            raise ValueError(
                "max_batch_size, max_queue_size and instances must be >= 1, max_delay_s >= 0"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._run = run
        self._observer = observer
        self._queue: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.instances = instances
        # A thread per instance: that many batches in flight per model, while the loop
        # gathers the next one.
        self._executor = ThreadPoolExecutor(instances, thread_name_prefix=f"engine-{name}")
        # At most `instances` engine runs at a time, from the executor or run_alone's caller.
        self._engine = threading.BoundedSemaphore(instances)
        self._running: set[asyncio.Task[None]] = set()
        self._instance_free = asyncio.Event()
        self._decoding = 0  # requests being decoded for this model (see decoding())

    @property
    def depth(self) -> int:
        """Items queued, including cancelled ones not yet dropped."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    def submit(
        self, rows: Sequence[np.ndarray], *, deadline: float | None = None, source: int = 0
    ) -> list[asyncio.Future[Outputs]]:
        """Queue rows (all or none); each future resolves to that row's outputs.

        Raises ``ShuttingDown`` after :meth:`stop` and ``Overloaded`` when the rows do not
        fit in the queue, so that a request is never half accepted. Rows still queued at
        ``deadline`` (event-loop time) fail with ``DeadlineExceeded`` instead of running.
        """
        if self._closing or self._task is None:
            raise ShuttingDown(f"model {self.name} is not accepting requests (shutting down)")
        if len(self._queue) + len(rows) > self.max_queue_size:
            raise Overloaded(
                f"model {self.name} has {len(self._queue)} images queued "
                f"(limit {self.max_queue_size}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures: list[asyncio.Future[Outputs]] = []
        for row in rows:
            future: asyncio.Future[Outputs] = loop.create_future()
            self._queue.append(Pending(row, future, now, deadline, source))
            futures.append(future)
        self._wakeup.set()
        if self._observer is not None:
            self._observer.queue_depth(len(self._queue))
        return futures

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Count a request as being decoded for this model, on the event loop.

        :meth:`run_alone` reads the count: while another request is being decoded, a lone
        row may soon have company, so it takes the queue instead.
        """
        self._decoding += 1
        try:
            yield
        finally:
            self._decoding -= 1

    def run_alone(self, row: np.ndarray, *, expires: float | None = None) -> Outputs | None:
        """Run one row now in the calling thread if it is alone, else None (use :meth:`submit`).

        Alone: no delay is configured, nothing is queued, no batch is running and the
        caller's request is the only one being decoded (:meth:`decoding`). Past ``expires``
        (``time.monotonic``) it is not run either: :meth:`submit`'s caller answers the
        missed deadline. Thread-safe; meant for the preprocessing thread that has just
        decoded the row.
        """
        alone = self.max_delay_s == 0 and not self._queue and self._decoding <= 1
        if not alone or self._closing or (expires is not None and time.monotonic() >= expires):
            return None
        if not self._engine.acquire(blocking=False):
            return None
        try:
            start = time.perf_counter()
            outputs = self._run([row])
            seconds = time.perf_counter() - start
        except InferenceFailed:
            raise
        except Exception as exc:
            raise self._engine_failed(exc, 1) from exc
        finally:
            self._engine.release()
        (result,) = _split(outputs, 1, self.name)
        if self._observer is not None:
            self._observer.batch_done(1, [0.0], seconds, 1)
        return result

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting, run what is queued (up to ``timeout_s``), fail anything left."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning("batcher %s: drain timed out, failing the rest", self.name)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        while self._queue:
            _set_exception(self._queue.popleft().future, ShuttingDown("the service shut down"))
        self._executor.shutdown(wait=False)

    async def _loop(self) -> None:
        try:
            while True:
                self._drop_cancelled_head()
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._wait_for_batch()
                if self.instances == 1:
                    batch = self._take()
                    if batch:
                        await self._run_batch(batch)
                    continue
                while len(self._running) >= self.instances:  # every instance is busy
                    self._instance_free.clear()
                    await self._instance_free.wait()
                batch = self._take()
                if batch:
                    task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                    self._running.add(task)
                    task.add_done_callback(self._batch_finished)
        except asyncio.CancelledError:  # stop() timed out: fail the batches still running
            for task in self._running:
                task.cancel()
            raise
        finally:  # every running batch resolves its futures before the loop ends
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._instance_free.set()

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _wait_for_batch(self) -> None:
        """Until the batch is full or the first item has waited ``max_delay_s``."""
        loop = asyncio.get_running_loop()
        deadline = self._queue[0].enqueued + self.max_delay_s
        while not self._full() and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _full(self) -> bool:
        """Whether a whole batch of live items is queued (cancelled ones do not count)."""
        if len(self._queue) < self.max_batch_size:
            return False
        if any(item.future.done() for item in islice(self._queue, self.max_batch_size)):
            self._queue = deque(item for item in self._queue if not item.future.done())
        return len(self._queue) >= self.max_batch_size

    def _take(self) -> list[Pending]:
        """Up to ``max_batch_size`` live items; cancelled and expired ones are dropped."""
        batch: list[Pending] = []
        now = asyncio.get_running_loop().time()
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.deadline is not None and now >= item.deadline:
                waited = now - item.enqueued
                _set_exception(
                    item.future,
                    DeadlineExceeded(
                        f"the request's deadline passed after {waited:.3f} s in the queue of "
                        f"model {self.name}; it was dropped before running"
                    ),
                )
                continue
            batch.append(item)
        if self._observer is not None:
            self._observer.queue_depth(len(self._queue))
        return batch

    async def _run_batch(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            rows = [item.row for item in batch]
            outputs = await loop.run_in_executor(self._executor, self._run_locked, rows)
            run_seconds = loop.time() - started
            split = _split(outputs, len(batch), self.name)
            for item, row_outputs in zip(batch, split, strict=True):
                _set_result(item.future, row_outputs)
            if self._observer is not None:
                waits = [started - item.enqueued for item in batch]
                sources = len({item.source for item in batch})
                self._observer.batch_done(len(batch), waits, run_seconds, sources)
        except InferenceFailed as exc:
            log.error("batcher %s: %s", self.name, exc.message)
            for item in batch:
                _set_exception(item.future, exc)
        except Exception as exc:
            failed = self._engine_failed(exc, len(batch))
            for item in batch:
                _set_exception(item.future, failed)
        finally:  # cancellation (shutdown) included: no future may be left pending
            for item in batch:
                _set_exception(item.future, ShuttingDown("the service shut down mid-batch"))

    def _engine_failed(self, exc: Exception, size: int) -> InferenceFailed:
        """The error for every image of a batch whose run raised ``exc`` (logged here)."""
        log.exception("batcher %s: engine failed on a batch of %d", self.name, size)
        return InferenceFailed(f"inference failed on a batch of {size}: {exc}")

    def _run_locked(self, rows: Sequence[np.ndarray]) -> Outputs:
        with self._engine:
            return self._run(rows)


def _split(outputs: Outputs, size: int, name: str) -> list[dict[str, np.ndarray]]:
    """Per-row views of each output, after checking that each has one row per input."""
    for key, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != size:
            raise InferenceFailed(
                f"model {name} returned {value.shape[0] if value.ndim else 'a scalar'} rows "
                f"of {key!r} for a batch of {size} inputs"
            )
    return [{key: value[i] for key, value in outputs.items()} for i in range(size)]
