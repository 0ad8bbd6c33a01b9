"""How front-end processes and the engine process talk (``--workers`` > 1).

Two channels per front end, both set up when it connects:

* **Control messages** on a Unix socket: small JSON objects, each framed by a 4-byte
  big-endian length (infer, cancel, load, unload one way; done, error, models the other).
* **Tensors** in shared memory: each front end owns an :class:`Arena`, an anonymous
  ``memfd`` whose descriptor travels once over the socket (``SCM_RIGHTS``), so both
  processes map the same pages. A request's preprocessed rows are written into a region
  of it; the engine batches them from there and, once they have all run, writes the
  outputs back into the same region. Nothing is pickled and no tensor crosses the socket.

The region belongs to the front end again only when the engine has answered the request
(done, error or cancelled): the engine answers each request exactly once.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.metadata import EMBEDDING_NAME, LOGITS_NAME, PROBABILITIES_NAME, RANKING_NAME

Message = dict[str, Any]

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024
"""A control message larger than this is a broken peer (model lists are a few KB)."""
ALIGN = 64
"""Regions start on cache-line boundaries (numpy and ONNX Runtime read them aligned)."""


class ChannelClosed(ConnectionError):
    """The other process closed the socket or died."""


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next framed JSON message; :class:`ChannelClosed` at end of stream."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(header)
        if length > MAX_MESSAGE:
            raise ChannelClosed(f"a control message of {length} bytes: the peer is broken")
        message: Message = json.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc) or "the peer closed the connection") from exc
    return message


def frame(message: Message) -> bytes:
    """``message`` as length-prefixed JSON bytes."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def send_hello(sock: socket.socket, message: Message, fd: int) -> None:
    """The first message on a new connection, with the arena's descriptor attached."""
    socket.send_fds(sock, [frame(message)], [fd])


def receive_hello(sock: socket.socket) -> tuple[Message, int]:
    """The hello message and the descriptor that came with it (blocking; see send_hello)."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if len(fds) != 1 or len(data) < _LENGTH.size:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed("the first message must carry one shared-memory descriptor")
    (length,) = _LENGTH.unpack_from(data)
    return json.loads(data[_LENGTH.size : _LENGTH.size + length]), fds[0]


class ModelShape(Protocol):
    """What a row layout depends on (an ``Engine``, or a front end's ``RemoteEngine``)."""

    @property
    def input_size(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def embedding_dim(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RowLayout:
    """Bytes of one row in a region: its input, then (after the engine) its outputs.

    Outputs are written over the inputs once every row of the request has run, so a
    region is ``count * row_bytes`` long.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    embedding_dim: int

    @classmethod
    def of(cls, model: ModelShape) -> RowLayout:
        """The layout of a model's rows: both processes compute it from the same figures."""
        size = model.input_size
        return cls((3, size, size), model.num_classes, model.embedding_dim)

    @property
    def input_bytes(self) -> int:
        c, h, w = self.input_shape
        return c * h * w * 4

    @property
    def output_bytes(self) -> int:
        # logits, probabilities (float32) and ranking (int64) per class, then the embedding.
        return self.num_classes * 16 + self.embedding_dim * 4

    @property
    def row_bytes(self) -> int:
        size = max(self.input_bytes, self.output_bytes)
        return -(-size // ALIGN) * ALIGN

    def inputs(self, buffer: memoryview, offset: int, count: int) -> np.ndarray:
        """The float32 [count, 3, H, W] input rows of a region (a view)."""
        rows = np.ndarray(
            (count, self.row_bytes // 4), dtype=np.float32, buffer=buffer, offset=offset
        )
        return rows[:, : self.input_bytes // 4].reshape(count, *self.input_shape)

    def write_outputs(
        self, buffer: memoryview, offset: int, outputs: list[Mapping[str, np.ndarray]]
    ) -> None:
        """Each row's four outputs into its slot of the region."""
        c, d = self.num_classes, self.embedding_dim
        for i, row in enumerate(outputs):
            start = offset + i * self.row_bytes
            floats = np.ndarray((2 * c,), np.float32, buffer, start)
            floats[:c] = row[LOGITS_NAME]
            floats[c:] = row[PROBABILITIES_NAME]
            np.ndarray((c,), np.int64, buffer, start + 8 * c)[:] = row[RANKING_NAME]
            np.ndarray((d,), np.float32, buffer, start + 16 * c)[:] = row[EMBEDDING_NAME]

    def read_outputs(
        self, buffer: memoryview, offset: int, count: int
    ) -> list[dict[str, np.ndarray]]:
        """Copies of each row's outputs (the region is reused once this returns)."""
        c, d = self.num_classes, self.embedding_dim
        rows = []
        for i in range(count):
            start = offset + i * self.row_bytes
            floats = np.ndarray((2 * c,), np.float32, buffer, start).copy()
            rows.append(
                {
                    LOGITS_NAME: floats[:c],
                    PROBABILITIES_NAME: floats[c:],
                    RANKING_NAME: np.ndarray((c,), np.int64, buffer, start + 8 * c).copy(),
                    EMBEDDING_NAME: np.ndarray((d,), np.float32, buffer, start + 16 * c).copy(),
                }
            )
        return rows


class Arena:
    """A front end's shared memory and the regions of it that requests hold.

    First-fit over a sorted free list: requests hold a region from the moment their
    rows are written until the engine answers. When no region is large enough the
    request is turned away (503) like one that finds the queue full.
    """

    def __init__(self, size: int) -> None:
        self.size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.fd = os.memfd_create("resnet-serve-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size)
        self.buffer = memoryview(self._map)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, length), sorted
        self.used = 0

    def allocate(self, length: int) -> int | None:
        """The offset of a free region of ``length`` bytes, or None when none is left."""
        length = -(-length // ALIGN) * ALIGN
        for i, (offset, size) in enumerate(self._free):
            if size >= length:
                if size == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, size - length)
                self.used += length
                return offset
        return None

    def release(self, offset: int, length: int) -> None:
        """Return a region, merging it with its free neighbours."""
        length = -(-length // ALIGN) * ALIGN
        self.used -= length
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, (offset, length))
        if i + 1 < len(free) and offset + length == free[i + 1][0]:
            free[i] = (offset, length + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]


def attach(fd: int, size: int) -> memoryview:
    """The engine's view of a front end's arena (the mapping outlives the descriptor)."""
    try:
        return memoryview(mmap.mmap(fd, size))
    finally:
        os.close(fd)
