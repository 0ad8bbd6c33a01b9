"""Random and mutated image bytes at a real server's /predict: only 200 or 4xx, ever.

Mutations start from real files of every served format (bit flips, cuts, insertions,
deletions, a lying size field), so most examples get past the format sniffing and into
the decoders. Examples are derandomized: every run tries the same ones.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import httpx
import pytest
from e2e_server import Server
from hostile_inputs import encode, picture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEEDS = {fmt: encode(picture(24, 18), fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")}
CONTENT_TYPES = ("application/octet-stream", "image/jpeg", "image/png", "image/gif", None)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "size"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif at + 4 <= len(data):  # a 32-bit field (a width, a length, an offset) made huge
            data[at : at + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=st.one_of(mutated(), st.binary(max_size=2048)),
    content_type=st.sampled_from(CONTENT_TYPES),
    as_multipart=st.booleans(),
)
def test_random_and_mutated_images_get_200_or_a_4xx(
    server: Server, data: bytes, content_type: str | None, as_multipart: bool
) -> None:
    if as_multipart:
        response = httpx.post(server.url + "/predict", files=[("file", ("x", data))], timeout=30)
    else:
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = httpx.post(server.url + "/predict", content=data, headers=headers, timeout=30)
    status = response.status_code
    assert status == 200 or 400 <= status < 500, response.text
    body = response.json()
    if status == 200:
        assert len(body["results"][0]["predictions"]) == 5
    else:
        assert body["error"]["code"] and body["error"]["message"]
