"""The shared path of /predict and /embed: request body -> images -> rows -> batcher -> rows.

1. :func:`read_images` takes the image files out of the request: the raw body, or every
   file part of a multipart form (parsed by python-multipart through Starlette).
2. :func:`preprocess` decodes and transforms them in the preprocessing thread pool, so a
   bad image fails its own request before anything is queued.
3. :func:`infer` queues the rows on the model's batcher and waits for their outputs; if
   the client disconnects first, the rows are cancelled and the batcher drops them. A lone
   image skips this step: the thread that decoded it runs it (``Batcher.run_alone``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
from fastapi import Request, Response
from pydantic_core import to_json
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Receive

from service.batcher import Batcher, Outputs
from service.errors import (
    BadRequest,
    ClientDisconnected,
    MissingImage,
    ModelNotReady,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.middleware import check_deadline, deadline_exceeded
from service.preprocess import Preprocessor
from service.registry import ServedModel
from service.routes.deps import AppContext
from service.settings import Settings

FILE_FIELDS = ("file", "files", "image", "images")
"""Multipart field names that carry images (``curl -F file=@cat.jpg``)."""
RAW_TYPES = frozenset(
    {
        "",  # no Content-Type header at all
        "application/octet-stream",
        # curl --data-binary's default; the bytes are the image all the same.
        "application/x-www-form-urlencoded",
    }
)
ACCEPTED = (
    "image/* (jpeg, png, webp, gif, bmp, tiff), application/octet-stream or multipart/form-data"
)

# OpenAPI description of the request body (FastAPI cannot infer it from a raw body).
_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or multipart/form-data with one or more "
        f"file parts named {' or '.join(repr(f) for f in FILE_FIELDS)}.",
        "content": {
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "image/webp": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": _BINARY["schema"]}},
                    "required": ["file"],
                }
            },
        },
    }
}

Image = tuple[str, bytes]
"""(where it came from, for error messages; its bytes)."""


async def read_images(request: Request, settings: Settings) -> list[Image]:
    """The image files in the request, in order; 4xx errors for anything else."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    _check_length(request, settings)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, settings)
    if not (media_type.startswith("image/") or media_type in RAW_TYPES):
        raise UnsupportedMediaType(f"Content-Type {media_type!r} is not accepted; send {ACCEPTED}")
    body = await read_body(request, settings)
    if not body:
        raise MissingImage(
            "the request body is empty; send the image bytes as the body, or multipart/form-data "
            "with file parts named 'file'"
        )
    return [("the image", body)]


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole raw body; 413 as soon as it is over ``max_body_bytes`` (the v2 routes too)."""
    _check_length(request, settings)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise _too_large(size, settings)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_length(request: Request, settings: Settings) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_body_bytes:
        raise _too_large(int(length), settings)


async def _read_multipart(request: Request, settings: Settings) -> list[Image]:
    limit = settings.max_images_per_request
    try:
        form = await request.form(max_files=limit, max_fields=limit)
    except HTTPException as exc:  # Starlette turns python-multipart's errors into 400s
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"too many files: at most {limit} images per request") from exc
        raise BadRequest(f"malformed multipart body: {exc.detail}") from exc
    try:
        images: list[Image] = []
        for field, value in form.multi_items():
            if field not in FILE_FIELDS:
                raise BadRequest(
                    f"unexpected form field {field!r}; send images as file parts named "
                    + " or ".join(repr(f) for f in FILE_FIELDS)
                )
            if not isinstance(value, UploadFile):
                raise BadRequest(
                    f"form field {field!r} is text, not a file; upload it with -F {field}=@FILE"
                )
            name = f"file {len(images) + 1} ({value.filename or 'unnamed'})"
            images.append((name, await value.read()))
    finally:
        await form.close()
    if not images:
        raise MissingImage("the multipart body has no file parts; send -F file=@IMAGE")
    return images


async def preprocess(
    images: Sequence[Image], preprocessor: Preprocessor, pool: Executor
) -> list[np.ndarray]:
    """Decode and transform every image in the pool; the first bad one fails the request."""
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(loop.run_in_executor(pool, preprocessor, data) for _, data in images),
        return_exceptions=True,
    )
    rows = []
    for (name, _), result in zip(images, results, strict=True):
        if isinstance(result, ServiceError):
            raise result.with_context(f"{name} of {len(images)}")
        if isinstance(result, BaseException):
            raise result
        rows.append(result)
    return rows


async def run_images(request: Request, served: ServedModel, context: AppContext) -> list[Outputs]:
    """Steps 1-3 for one request, in flight on its model (unloading waits for it)."""
    with served.in_flight():
        images = await read_images(request, context.settings)
        return await run_files(request, served, context, images)


async def run_files(
    request: Request, served: ServedModel, context: AppContext, images: Sequence[Image]
) -> list[Outputs]:
    """Steps 2-3 for image files already taken out of a request, with their metrics."""
    if served.preprocessor is None:
        raise ModelNotReady(f"model {served.name!r} version {served.version} was unloaded")
    if len(images) > context.settings.max_images_per_request:
        raise PayloadTooLarge(
            f"{len(images)} images; at most {context.settings.max_images_per_request} per request"
        )
    deadline = check_deadline(request, "before its images were decoded")
    loop = asyncio.get_running_loop()
    # The same deadline on the clock of the preprocessing threads.
    expires = None if deadline is None else time.monotonic() + (deadline - loop.time())
    batcher = served.batcher
    if batcher is None:  # unloaded while this request was being read
        raise ModelNotReady(f"model {served.name!r} version {served.version} was unloaded")
    start = time.perf_counter()
    ran_alone: Outputs | None = None
    run_seconds = 0.0
    batcher.decoding += 1
    try:
        if len(images) == 1:  # decoded, and run at once if it is alone (Batcher.run_alone)
            row, ran_alone, run_seconds = await loop.run_in_executor(
                context.preprocess_pool,
                _decode_and_run_alone,
                served.preprocessor,
                batcher,
                images[0][1],
                expires,
            )
            rows = [row]
        else:
            rows = await preprocess(images, served.preprocessor, context.preprocess_pool)
    finally:
        batcher.decoding -= 1
    decode_seconds = time.perf_counter() - start - run_seconds
    context.metrics.preprocess.labels(served.name).observe(decode_seconds)
    context.metrics.images.labels(served.name).inc(len(rows))
    if ran_alone is not None:
        return [ran_alone]
    return await infer(request, served, rows)


def _decode_and_run_alone(
    preprocessor: Preprocessor, batcher: Batcher, data: bytes, expires: float | None
) -> tuple[np.ndarray, Outputs | None, float]:
    """(the row, its outputs if it ran alone or None, seconds running it), in a pool thread."""
    row = preprocessor(data)
    start = time.perf_counter()
    outputs = batcher.run_alone(row, expires=expires)
    return row, outputs, (time.perf_counter() - start) if outputs is not None else 0.0


def json_response(payload: object) -> Response:
    """JSON encoded by pydantic-core (fast for long float lists), no re-validation."""
    return Response(to_json(payload), media_type="application/json")


async def infer(request: Request, served: ServedModel, rows: Sequence[np.ndarray]) -> list[Outputs]:
    """Each row's outputs, through the model's batcher; cancelled if the client leaves.

    Past the request's deadline (``service.middleware``) the rows are cancelled, so the
    batcher drops them unrun, and the request ends in a 504.
    """
    if served.batcher is None:  # unloaded while this request was being decoded
        raise ModelNotReady(f"model {served.name!r} version {served.version} was unloaded")
    deadline = check_deadline(request, "before its images were queued")
    futures = served.batcher.submit(rows, deadline=deadline)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    # On disconnect, cancel the rows: the batcher drops them instead of running them.
    watcher.add_done_callback(lambda _: [f.cancel() for f in futures])
    try:
        if deadline is None:
            return list(await asyncio.gather(*futures))
        timeout = deadline - asyncio.get_running_loop().time()
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for future in futures:
            if future.done() and (future.cancelled() or future.exception() is not None):
                future.result()  # raises the first failure, in request order
        if not all(future.done() for future in futures):
            raise deadline_exceeded(request.scope, "while waiting for the model")
        return [future.result() for future in futures]
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected("the client left before its result was ready") from None
        raise
    finally:
        watcher.cancel()
        for future in futures:
            future.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _too_large(size: int, settings: Settings) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is {size} bytes or more; at most {settings.max_body_bytes} bytes "
        "are allowed"
    )
