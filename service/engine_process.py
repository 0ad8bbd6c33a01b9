"""The engine process (``--workers`` > 1): every model's session and batcher, for all front ends.

It runs the same :class:`~service.registry.ModelRegistry` as a single-process server, so
a model version has one ONNX Runtime session (one copy of its weights) and one batcher on
this device, and images from every front end share its batches. Front ends connect over
a Unix socket (:mod:`service.ipc`); each gets the model list at once and again whenever
it changes, so a load or unload through any front end reaches all of them.

Each ``infer`` is answered exactly once: ``done`` (outputs written into the sender's
shared memory), ``error`` (a service error, with its status and code) or ``cancelled``.
A front end that goes away has its queued images cancelled, so the batcher drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from service.batcher import Outputs
from service.errors import InferenceFailed, ServiceError
from service.ipc import (
    ChannelClosed,
    Message,
    RowLayout,
    attach,
    frame,
    read_message,
    receive_hello,
)
from service.logs import configure_logging
from service.metrics import Metrics
from service.registry import UNLOAD_GRACE_S, ModelRegistry, ServedModel
from service.settings import Settings

log = logging.getLogger("service.engine")

HELLO_TIMEOUT_S = 5.0


def describe(registry: ModelRegistry) -> Message:
    """The ``models`` message: every version's state and, when ready, what serves it."""
    models = []
    for versions in registry.models.values():
        for served in versions.values():
            entry: dict[str, Any] = {
                "name": served.name,
                "version": served.version,
                "path": str(served.path),
                "state": served.state.value,
                "reason": served.reason,
                "warmup_seconds": served.warmup_seconds,
                "batching": vars(served.batching),
            }
            if served.loaded is not None:
                engine = served.loaded.engine
                entry["engine"] = {
                    "card": engine.card.model_dump(mode="json"),
                    "provider": engine.provider,
                    "sha256": engine.sha256,
                    "num_classes": engine.num_classes,
                    "embedding_dim": engine.embedding_dim,
                }
            models.append(entry)
    return {
        "op": "models",
        "models": models,
        "scanned": registry.scanned,
        "repository_error": registry.repository_error,
        "marked_default": sorted(registry.marked_default),
    }


def error_message(request: int, exc: ServiceError) -> Message:
    """An ``error`` answer that the front end turns back into the same HTTP error."""
    return {
        "op": "error",
        "id": request,
        "status": exc.status,
        "code": exc.code,
        "message": exc.message,
        "headers": exc.headers,
    }


@dataclass(eq=False)
class Connection:
    """One front end: its socket, its shared memory and its requests being served."""

    writer: asyncio.StreamWriter
    buffer: memoryview
    pid: int
    requests: dict[int, _Request] = field(default_factory=dict)
    quiescing: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(message))


class _Request:
    """One front end's request in the engine: answered once all its rows have resolved."""

    def __init__(
        self,
        conn: Connection,
        ident: int,
        served: ServedModel,
        layout: RowLayout,
        offset: int,
        futures: list[asyncio.Future[Outputs]],
    ) -> None:
        self.conn, self.ident, self.served = conn, ident, served
        self.layout, self.offset, self.futures = layout, offset, futures
        self._left = len(futures)
        served.begin_request()  # unloading the version waits for it
        for future in futures:
            future.add_done_callback(self._row_done)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()

    def _row_done(self, _: asyncio.Future[Outputs]) -> None:
        self._left -= 1
        if self._left:
            return
        self.conn.requests.pop(self.ident, None)
        self.served.end_request()
        self.conn.send(self._answer())

    def _answer(self) -> Message:
        if any(future.cancelled() for future in self.futures):
            return {"op": "cancelled", "id": self.ident}
        for future in self.futures:
            exc = future.exception()
            if isinstance(exc, ServiceError):
                return error_message(self.ident, exc)
            if exc is not None:
                failed = InferenceFailed(f"inference failed: {exc}")
                return error_message(self.ident, failed)
        outputs = [future.result() for future in self.futures]
        self.layout.write_outputs(self.conn.buffer, self.offset, outputs)
        return {"op": "done", "id": self.ident}


class EngineServer:
    """Serves the registry's models to front-end processes over a Unix socket."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.connections: set[Connection] = set()
        self._pending_broadcast = False
        self._tasks: set[asyncio.Task[None]] = set()  # held, so none is collected mid-run
        self._quiescing: set[str] = set()
        self._ids = itertools.count(1)
        registry.on_change(self._schedule_broadcast)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, listener: socket.socket) -> None:
        """Accept front ends until cancelled."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            self._spawn(self._accept(sock))

    def _schedule_broadcast(self) -> None:
        # Changes often come in bursts (a model's versions); one message per loop turn.
        if not self._pending_broadcast:
            self._pending_broadcast = True
            asyncio.get_running_loop().call_soon(self._broadcast)

    def _broadcast(self) -> None:
        self._pending_broadcast = False
        message = describe(self.registry)
        message["quiescing"] = sorted(self._quiescing)
        for conn in self.connections:
            conn.send(message)

    async def _accept(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            hello, fd = await asyncio.to_thread(receive_hello, sock)
            buffer = attach(fd, int(hello["arena_size"]))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
        except (OSError, ChannelClosed, ValueError, KeyError) as exc:
            log.warning("a front end failed to connect: %s", exc)
            sock.close()
            return
        conn = Connection(writer, buffer, int(hello.get("pid", 0)))
        self.connections.add(conn)
        log.info("front end %d connected", conn.pid)
        conn.send(describe(self.registry))
        try:
            while True:
                self._handle(conn, await read_message(reader))
        except ChannelClosed:
            log.info("front end %d disconnected", conn.pid)
        finally:
            self.connections.discard(conn)
            for request in list(conn.requests.values()):
                request.cancel()  # its images are dropped from the queues, unrun
            for future in conn.quiescing.values():
                future.cancel()  # nothing of it is in flight any more
            writer.close()

    def _handle(self, conn: Connection, message: Message) -> None:
        op = message["op"]
        if op == "infer":
            self._infer(conn, message)
        elif op == "cancel":
            request = conn.requests.get(message["id"])
            if request is not None:
                request.cancel()
        elif op in ("load", "unload"):
            self._spawn(self._control(conn, message))
        elif op == "quiesced":
            future = conn.quiescing.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(None)
        else:
            log.warning("front end %d sent an unknown message %r", conn.pid, op)

    def _infer(self, conn: Connection, message: Message) -> None:
        """Queue a request's rows; :class:`_Request` answers when they have all resolved.

        No task per request: the rows' futures call back, which keeps the engine's event
        loop (the one place all front ends' requests meet) as short as it can be.
        """
        ident: int = message["id"]
        try:
            served = self.registry.resolve(message["model"], message["version"])
            loaded = served.require_loaded()
            layout = RowLayout.of(loaded.engine)
            offset, count = message["offset"], message["count"]
            # Views: the batch copies them when it runs. The region is the front end's again
            # only once this request is answered, after every row's batch has run; a row
            # cancelled while its batch starts may be overwritten, which only spoils the
            # outputs nobody waits for.
            rows = layout.inputs(conn.buffer, offset, count)
            remaining = message.get("timeout")
            deadline = None
            if remaining is not None:
                deadline = asyncio.get_running_loop().time() + remaining
            futures = loaded.batcher.submit(list(rows), deadline=deadline, source=conn.pid)
        except ServiceError as exc:
            conn.send(error_message(ident, exc))
            return
        except Exception as exc:
            log.exception("engine: request %s failed", message.get("request_id", ident))
            conn.send(error_message(ident, InferenceFailed(f"inference failed: {exc}")))
            return
        conn.requests[ident] = _Request(conn, ident, served, layout, offset, futures)

    async def _control(self, conn: Connection, message: Message) -> None:
        ident, name = message["id"], message["name"]
        try:
            if name in self.registry.models:
                await self._quiesce(name)
            if message["op"] == "load":
                await self.registry.load(name)
            else:
                await self.registry.unload(name)
            self._quiescing.discard(name)
            self._broadcast()  # before the answer, so the caller sees the new list first
            conn.send({"op": "control_done", "id": ident})
        except ServiceError as exc:
            conn.send(error_message(ident, exc))
        except Exception as exc:
            log.exception("engine: %s %s failed", message["op"], name)
            conn.send(error_message(ident, InferenceFailed(f"{message['op']} failed: {exc}")))
        finally:
            if name in self._quiescing:
                self._quiescing.discard(name)
                self._broadcast()

    async def _quiesce(self, name: str) -> None:
        """Every front end stops routing to ``name`` and waits for its requests in flight.

        What a single process does before unloading (``ModelRegistry._unload``), across
        processes: a request being read or decoded in any front end finishes first.
        """
        self._quiescing.add(name)
        loop = asyncio.get_running_loop()
        waiting = []
        for conn in self.connections:
            ident = next(self._ids)
            conn.quiescing[ident] = future = loop.create_future()
            conn.send({"op": "quiesce", "id": ident, "name": name})
            waiting.append(future)
        if waiting:
            await asyncio.wait(waiting, timeout=UNLOAD_GRACE_S)


async def _run(settings: Settings, path: str) -> None:
    registry = ModelRegistry(settings, Metrics())
    server = EngineServer(registry)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by an engine that died
    listener.bind(path)
    listener.listen(128)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    serving = loop.create_task(server.serve(listener))
    loading = loop.create_task(registry.load_all())
    await stop.wait()
    log.info("engine: draining")
    serving.cancel()
    loading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    await registry.close()  # runs what is queued, up to drain_timeout_s
    listener.close()


def main(settings: Settings, path: str) -> None:
    """The engine process's entry point (started by :mod:`service.supervisor`)."""
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_run(settings, path))
