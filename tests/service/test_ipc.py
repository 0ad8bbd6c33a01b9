"""The engine process's channels: framed messages, the shared-memory arena, row layout."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from service.ipc import (
    ALIGN,
    Arena,
    ChannelClosed,
    RowLayout,
    attach,
    frame,
    read_message,
    receive_hello,
    send_hello,
)
from service.metadata import EMBEDDING_NAME, LOGITS_NAME, PROBABILITIES_NAME, RANKING_NAME


async def test_framed_messages_round_trip_and_end_of_stream_is_closed() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frame({"op": "infer", "id": 7, "timeout": None}) + frame({"op": "x"}))
    reader.feed_data(frame({"op": "cut"})[:5])
    reader.feed_eof()
    assert await read_message(reader) == {"op": "infer", "id": 7, "timeout": None}
    assert await read_message(reader) == {"op": "x"}
    with pytest.raises(ChannelClosed):
        await read_message(reader)  # a message cut short by the peer's death


def test_arena_allocates_first_fit_and_merges_what_is_released() -> None:
    arena = Arena(4 * 4096)
    a = arena.allocate(100)  # rounded up to the alignment
    b = arena.allocate(ALIGN * 2)
    c = arena.allocate(ALIGN)
    assert (a, b, c) == (0, ALIGN * 2, ALIGN * 4)
    assert arena.used == ALIGN * 5
    arena.release(b, ALIGN * 2)
    assert arena.allocate(ALIGN) == ALIGN * 2  # the first hole that fits
    arena.release(a, 100)
    arena.release(ALIGN * 2, ALIGN)
    arena.release(c, ALIGN)
    assert arena.used == 0
    assert arena.allocate(arena.size) == 0  # every hole merged back into one
    assert arena.allocate(1) is None  # full: the caller answers 503


def test_the_engine_sees_the_front_ends_rows_and_the_front_end_its_outputs() -> None:
    arena = Arena(1 << 20)
    layout = RowLayout((3, 8, 8), num_classes=5, embedding_dim=7)
    rows = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    offset = arena.allocate(layout.row_bytes * 3)
    assert offset is not None
    layout.inputs(arena.buffer, offset, 3)[:] = rows
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with front, back:
        send_hello(front, {"op": "hello", "arena_size": arena.size}, arena.fd)
        hello, fd = receive_hello(back)
    engine_view = attach(fd, hello["arena_size"])  # another mapping of the same pages
    np.testing.assert_array_equal(layout.inputs(engine_view, offset, 3), rows)
    outputs = [
        {
            LOGITS_NAME: np.arange(5, dtype=np.float32) + i,
            PROBABILITIES_NAME: np.full(5, 0.2, np.float32),
            RANKING_NAME: np.arange(5)[::-1].copy(),
            EMBEDDING_NAME: np.full(7, i, np.float32),
        }
        for i in range(3)
    ]
    layout.write_outputs(engine_view, offset, outputs)
    back_here = layout.read_outputs(arena.buffer, offset, 3)
    for sent, got in zip(outputs, back_here, strict=True):
        assert set(got) == set(sent)
        for name in sent:
            np.testing.assert_array_equal(got[name], sent[name])
    layout.inputs(arena.buffer, offset, 3)[:] = 0  # the region is reused...
    assert back_here[2][EMBEDDING_NAME][0] == 2.0  # ...and what was read is a copy


def test_row_bytes_hold_the_larger_of_input_and_outputs_aligned() -> None:
    small_input = RowLayout((3, 4, 4), num_classes=1000, embedding_dim=2048)
    assert small_input.row_bytes == 1000 * 16 + 2048 * 4  # outputs are larger
    resnet = RowLayout((3, 224, 224), num_classes=1000, embedding_dim=2048)
    assert resnet.row_bytes == 3 * 224 * 224 * 4
    assert all(layout.row_bytes % ALIGN == 0 for layout in (small_input, resnet))


def test_a_hello_without_a_descriptor_is_refused() -> None:
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with front, back:
        front.sendall(frame({"op": "hello"}))
        with pytest.raises(ChannelClosed):
            receive_hello(back)
