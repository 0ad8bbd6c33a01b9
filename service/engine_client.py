"""A front end's side of the engine process (``--workers`` > 1).

:class:`EngineClient` keeps one connection to the engine process (reconnecting when the
engine is restarted) and turns its answers back into futures and HTTP errors.
:class:`RemoteBatcher` and :class:`RemoteEngine` stand in for a model version's batcher
and engine in the front end's registry, so the data plane and the routes run unchanged:
rows are written into this process's shared memory and the engine process batches them
with every other front end's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.batcher import Outputs
from service.errors import ModelNotReady, Overloaded, ServiceError
from service.ipc import Arena, ChannelClosed, Message, RowLayout, frame, read_message, send_hello
from service.logs import request_id
from service.metadata import ModelCard

log = logging.getLogger(__name__)

RECONNECT_S = 0.1
"""Pause between attempts to reach an engine process that is (re)starting."""


class EngineUnavailable(ModelNotReady):
    """The engine process is not there (starting, or restarting after it died)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


def remote_error(message: Message) -> ServiceError:
    """The service error that an engine's ``error`` answer describes."""
    error = ServiceError(message["message"], headers=message.get("headers") or None)
    error.status, error.code = message["status"], message["code"]
    return error


@dataclass(slots=True)
class _Request:
    future: asyncio.Future[list[Outputs]]
    offset: int
    length: int
    layout: RowLayout
    count: int


class EngineClient:
    """One front end's connection to the engine process, and its shared memory."""

    def __init__(
        self,
        path: str,
        arena_bytes: int,
        on_models: Callable[[Message], None],
        on_quiesce: Callable[[str], Awaitable[None]],
    ) -> None:
        self.path = path
        self.arena = Arena(arena_bytes)
        self.on_models = on_models
        self.on_quiesce = on_quiesce
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = False
        self._writer: asyncio.StreamWriter | None = None
        self._requests: dict[int, _Request] = {}
        self._controls: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Stay connected to the engine until cancelled; reconnect when it restarts."""
        first = True
        while True:
            try:
                reader, self._writer = await self._connect()
            except OSError:
                await asyncio.sleep(RECONNECT_S)  # the engine is starting: its socket is not up
                continue
            try:
                # Connected once the engine's model list is here: until then the list this
                # process holds is the last engine's, which may no longer be true.
                self._dispatch(await read_message(reader))
                self.connected = True
                if not first:
                    log.info("reconnected to the engine process")
                first = False
                while True:
                    self._dispatch(await read_message(reader))
            except ChannelClosed:
                log.error("the engine process went away: failing what it held, reconnecting")
            finally:
                self.connected = False
                self._writer.close()
                self._writer = None
                self._fail_all(EngineUnavailable("the engine process stopped; retry shortly"))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            sock.setblocking(True)
            hello = {"op": "hello", "pid": os.getpid(), "arena_size": self.arena.size}
            send_hello(sock, hello, self.arena.fd)
            sock.setblocking(False)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def infer(
        self,
        model: str,
        version: int,
        layout: RowLayout,
        rows: Sequence[np.ndarray],
        timeout: float | None,
    ) -> asyncio.Future[list[Outputs]]:
        """Send ``rows`` to the engine; the future resolves to one output mapping per row.

        Cancelling the future cancels the request in the engine (its rows are dropped).
        """
        writer = self._writer
        if writer is None:
            raise EngineUnavailable("the engine process is not connected yet; retry shortly")
        length = layout.row_bytes * len(rows)
        offset = self.arena.allocate(length)
        if offset is None:
            raise Overloaded(
                f"this front end's shared memory is full ({self.arena.used} of "
                f"{self.arena.size} bytes in use); retry shortly"
            )
        region = layout.inputs(self.arena.buffer, offset, len(rows))
        for i, row in enumerate(rows):
            region[i] = row
        ident = next(self._ids)
        future: asyncio.Future[list[Outputs]] = asyncio.get_running_loop().create_future()
        self._requests[ident] = _Request(future, offset, length, layout, len(rows))
        message = {
            "op": "infer",
            "id": ident,
            "model": model,
            "version": version,
            "offset": offset,
            "count": len(rows),
            "timeout": timeout,
            "request_id": request_id.get(),
        }
        writer.write(frame(message))
        future.add_done_callback(lambda f: self._cancel(ident) if f.cancelled() else None)
        return future

    async def control(self, op: str, name: str) -> None:
        """Ask the engine to load or unload ``name``; returns once every front end knows."""
        writer = self._writer
        if writer is None:
            raise EngineUnavailable("the engine process is not connected yet; retry shortly")
        ident = next(self._ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._controls[ident] = future
        writer.write(frame({"op": op, "id": ident, "name": name}))
        await future

    async def _quiesce(self, message: Message) -> None:
        await self.on_quiesce(message["name"])
        if self._writer is not None:
            self._writer.write(frame({"op": "quiesced", "id": message["id"]}))

    def _cancel(self, ident: int) -> None:
        if ident in self._requests and self._writer is not None:
            self._writer.write(frame({"op": "cancel", "id": ident}))

    def _dispatch(self, message: Message) -> None:
        op = message["op"]
        if op == "models":
            self.on_models(message)
            return
        if op == "quiesce":
            task = asyncio.get_running_loop().create_task(self._quiesce(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        ident = message["id"]
        control = self._controls.pop(ident, None)
        if control is not None:
            if op == "error":
                _set_exception(control, remote_error(message))
            elif not control.done():
                control.set_result(None)
            return
        request = self._requests.pop(ident, None)
        if request is None:
            return
        try:
            if op == "done" and not request.future.done():
                outputs = request.layout.read_outputs(
                    self.arena.buffer, request.offset, request.count
                )
                request.future.set_result(list(outputs))
            elif op == "error":
                _set_exception(request.future, remote_error(message))
            else:  # cancelled: the caller cancelled it, or the engine is stopping
                _set_exception(request.future, EngineUnavailable("the engine dropped it"))
        finally:
            self.arena.release(request.offset, request.length)

    def _fail_all(self, error: ServiceError) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            _set_exception(request.future, error)
            self.arena.release(request.offset, request.length)
        controls, self._controls = self._controls, {}
        for control in controls.values():
            _set_exception(control, error)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


@dataclass(frozen=True)
class RemoteEngine:
    """What the routes read from a model version's engine, as the engine process says."""

    path: Path
    card: ModelCard
    provider: str
    sha256: str
    num_classes: int
    embedding_dim: int

    @classmethod
    def from_message(cls, path: str, entry: Message) -> RemoteEngine:
        return cls(
            Path(path),
            ModelCard.model_validate(entry["card"]),
            entry["provider"],
            entry["sha256"],
            entry["num_classes"],
            entry["embedding_dim"],
        )

    @property
    def input_size(self) -> int:
        return self.card.preprocessing.crop

    @property
    def layout(self) -> RowLayout:
        return RowLayout.of(self)


class RemoteBatcher:
    """A model version's batcher as a front end sees it: the queue is in the engine."""

    def __init__(self, client: EngineClient, name: str, version: int, layout: RowLayout) -> None:
        self.client = client
        self.name = name
        self.version = version
        self.layout = layout
        self.depth = 0
        """Images this front end has sent and not yet had back."""

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        yield  # the engine process batches; nothing here waits for company

    def run_alone(self, row: np.ndarray, *, expires: float | None = None) -> Outputs | None:
        return None  # every image goes to the engine process

    def submit(
        self, rows: Sequence[np.ndarray], *, deadline: float | None = None, source: int = 0
    ) -> list[asyncio.Future[Outputs]]:
        """One future per row, like :meth:`Batcher.submit`; cancelling any cancels all."""
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        whole = self.client.infer(self.name, self.version, self.layout, rows, timeout)
        self.depth += len(rows)
        futures: list[asyncio.Future[Outputs]] = [loop.create_future() for _ in rows]

        def resolve(done: asyncio.Future[list[Outputs]]) -> None:
            self.depth -= len(rows)
            for i, future in enumerate(futures):
                if future.done():
                    continue
                if done.cancelled():
                    future.cancel()
                elif done.exception() is not None:
                    future.set_exception(done.exception())  # type: ignore[arg-type]
                else:
                    future.set_result(done.result()[i])

        whole.add_done_callback(resolve)
        for future in futures:
            future.add_done_callback(lambda f: whole.cancel() if f.cancelled() else None)
        return futures

    async def stop(self, timeout_s: float | None = None) -> None:
        """Nothing is queued here: the engine process drains its own queues."""
