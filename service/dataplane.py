"""The data plane: what every protocol does with a request once it has parsed it.

/predict, /embed and the v2 protocol's infer are thin adapters onto :class:`DataPlane`
(as in KServe's python server). The path of a request, in order:

1. :meth:`DataPlane.read_images` (or :meth:`DataPlane.read_body` for v2) takes the image
   files out of the HTTP request, with the body size and file count limits.
2. :meth:`DataPlane.run_images` decodes and transforms them in the preprocessing thread
   pool, so a bad image fails its own request before anything is queued. A lone image
   is run at once by the thread that decoded it when the model is idle
   (``Batcher.run_alone``; the batcher decides).
3. :meth:`DataPlane.run_rows` queues the rows on the model's batcher and waits for their
   outputs; if the client disconnects or the deadline passes first, the rows are
   cancelled and the batcher drops them unrun. Already-preprocessed tensors (v2 ``input``)
   start here.

Nothing here knows a protocol's request or response format; the routes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Receive

from service.batcher import Outputs
from service.errors import (
    BadRequest,
    ClientDisconnected,
    MissingImage,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.metrics import Metrics
from service.middleware import check_deadline, deadline_exceeded
from service.preprocess import Preprocessor
from service.registry import Loaded, ModelRegistry, ServedModel
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

Image = tuple[str, bytes]
"""(where it came from, for error messages; its bytes)."""


class DataPlane:
    """The shared path from a parsed request to its outputs, for every protocol."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, metrics: Metrics, pool: Executor
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.pool = pool
        """Decodes and preprocesses images (``preprocess_threads`` threads)."""

    @classmethod
    def create(cls, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> DataPlane:
        """A data plane with its own preprocessing pool (closed by :meth:`close`)."""
        pool = ThreadPoolExecutor(
            settings.effective_preprocess_threads(), thread_name_prefix="preprocess"
        )
        return cls(settings, registry, metrics, pool)

    def close(self) -> None:
        """Stop the preprocessing pool (the app's shutdown, after the models drained)."""
        if isinstance(self.pool, ThreadPoolExecutor):
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def read_images(self, request: Request) -> list[Image]:
        """The image files in the request, in order; 4xx errors for anything else."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        self._check_length(request)
        if media_type == "multipart/form-data":
            return await self._read_multipart(request)
        if not (media_type.startswith("image/") or media_type in RAW_TYPES):
            raise UnsupportedMediaType(
                f"Content-Type {media_type!r} is not accepted; send {ACCEPTED}"
            )
        body = await self.read_body(request)
        if not body:
            raise MissingImage(
                "the request body is empty; send the image bytes as the body, or "
                "multipart/form-data with file parts named 'file'"
            )
        return [("the image", body)]

    async def read_body(self, request: Request) -> bytes:
        """The whole raw body; 413 as soon as it is over ``max_body_bytes``."""
        self._check_length(request)
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def run_request(self, request: Request, served: ServedModel) -> list[Outputs]:
        """The images of an image request (/predict, /embed), read and run on ``served``,
        in flight on it from the first byte read (unloading waits for the request)."""
        with self.in_flight(served):
            images = await self.read_images(request)
            return await self.run_images(request, served, images)

    @contextlib.contextmanager
    def in_flight(self, served: ServedModel) -> Iterator[None]:
        """A request in flight on ``served`` (unloading waits for it), counted in metrics."""
        gauge = self.metrics.in_flight.labels(served.name)
        gauge.inc()
        try:
            with served.in_flight():
                yield
        finally:
            gauge.dec()

    async def run_images(
        self, request: Request, served: ServedModel, images: Sequence[Image]
    ) -> list[Outputs]:
        """Decode ``images`` and run them on ``served``: one output mapping per image.

        The caller holds :meth:`in_flight` (unloading waits for the request).
        """
        loaded = served.require_loaded()
        self.check_count(len(images))
        deadline = check_deadline(request, "before its images were decoded")
        loop = asyncio.get_running_loop()
        # The same deadline on the clock of the preprocessing threads.
        expires = None if deadline is None else time.monotonic() + (deadline - loop.time())
        start = time.perf_counter()
        ran_alone: Outputs | None = None
        run_seconds = 0.0
        with loaded.batcher.decoding():
            if len(images) == 1:  # decoded, and run at once if it is alone (run_alone)
                row, ran_alone, run_seconds = await loop.run_in_executor(
                    self.pool, _decode_and_run_alone, loaded, images[0][1], expires
                )
                rows = [row]
            else:
                rows = await self._preprocess(images, loaded.preprocessor)
        decode_seconds = time.perf_counter() - start - run_seconds
        self.metrics.preprocess.labels(served.name).observe(decode_seconds)
        self.metrics.images.labels(served.name).inc(len(rows))
        if ran_alone is not None:
            return [ran_alone]
        return await self._infer(request, served, loaded, rows)

    async def run_rows(
        self, request: Request, served: ServedModel, rows: Sequence[np.ndarray]
    ) -> list[Outputs]:
        """Run already-preprocessed rows (float32 [3, H, W]) on ``served``, through its queue."""
        loaded = served.require_loaded()
        self.check_count(len(rows))
        self.metrics.images.labels(served.name).inc(len(rows))
        return await self._infer(request, served, loaded, rows)

    def check_count(self, count: int, what: str = "") -> None:
        """413 when a request carries more images than ``max_images_per_request``.

        ``what`` names the count in the protocol's terms (default: "N images").
        """
        limit = self.settings.max_images_per_request
        if count > limit:
            raise PayloadTooLarge(f"{what or f'{count} images'}; at most {limit} per request")

    async def _preprocess(
        self, images: Sequence[Image], preprocessor: Preprocessor
    ) -> list[np.ndarray]:
        """Decode and transform every image in the pool; the first bad one fails the request."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.pool, preprocessor, data) for _, data in images),
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

    async def _infer(
        self, request: Request, served: ServedModel, loaded: Loaded, rows: Sequence[np.ndarray]
    ) -> list[Outputs]:
        """Each row's outputs, through the model's batcher; cancelled if the client leaves.

        Past the request's deadline (``service.middleware``) the rows are cancelled, so the
        batcher drops them unrun, and the request ends in a 504.
        """
        deadline = check_deadline(request, "before its images were queued")
        futures = loaded.batcher.submit(rows, deadline=deadline)
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

    def _check_length(self, request: Request) -> None:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            raise self._too_large(int(length))

    async def _read_multipart(self, request: Request) -> list[Image]:
        limit = self.settings.max_images_per_request
        try:
            form = await request.form(max_files=limit, max_fields=limit)
        except HTTPException as exc:  # Starlette turns python-multipart's errors into 400s
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(
                    f"too many files: at most {limit} images per request"
                ) from exc
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

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {size} bytes or more; at most "
            f"{self.settings.max_body_bytes} bytes are allowed"
        )


def _decode_and_run_alone(
    loaded: Loaded, data: bytes, expires: float | None
) -> tuple[np.ndarray, Outputs | None, float]:
    """(the row, its outputs if it ran alone or None, seconds running it), in a pool thread."""
    row = loaded.preprocessor(data)
    batcher = loaded.batcher
    start = time.perf_counter()
    outputs = batcher.run_alone(row, expires=expires)
    return row, outputs, (time.perf_counter() - start) if outputs is not None else 0.0


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
