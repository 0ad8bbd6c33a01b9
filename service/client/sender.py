"""Images to ``/predict`` or ``/embed``: retries, and whose fault a failure is.

A failure is one of three kinds, and each is handled where it can be decided:

* the image's own (a corrupt or unreadable file, one too large): a :class:`Rejected`
  answer that the output records, so that one bad file never stops a folder;
* the server's for now (503 overloaded, 504, a reset connection): retried, after the
  server's ``Retry-After`` or a growing backoff; still failing, the image is left out of
  the output so that a rerun sends it again;
* the request's (unknown model, wrong API key, ``top_k`` out of range) or the server's
  for good (unreachable): :class:`~service.client.errors.Fatal`, as every image would fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import httpx

from service.client.errors import EXIT_UNREACHABLE, EXIT_USAGE, Fatal

log = logging.getLogger(__name__)

IMAGE_FAULTS = frozenset(
    {"unsupported_image", "invalid_image", "missing_image", "payload_too_large", "unreadable"}
)
"""Error codes that belong to the image sent (see docs/api.md), not to the request."""
OCTET_STREAM = "application/octet-stream"
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_WAIT_S = 30.0
"""The longest pause before a retry, whatever ``Retry-After`` says."""


@dataclass(frozen=True)
class Rejected:
    """An image the server (or the file system) refused for what it is: recorded, not retried."""

    status: int
    code: str
    message: str


Result = dict[str, Any] | Rejected
"""What is recorded of an image: the server's result for it (with ``model`` and
``version``), or its rejection."""
Answer = Result | None
"""Per image sent: its result, or None when the server kept failing and the image is left
for a rerun."""


class Sender:
    """Posts a batch of images as one request and splits the answer per image."""

    def __init__(
        self, client: httpx.AsyncClient, route: str, params: dict[str, str], *, retries: int
    ) -> None:
        self.client, self.route, self.params, self.retries = client, route, params, retries
        self.retried = 0
        self.last_failure = ""
        """What the last image left for a rerun failed with."""
        self.split_warned = False

    async def send(self, images: list[tuple[str, bytes]]) -> list[Answer]:
        """One answer per image, in order; raises :class:`Fatal` for run-wide failures."""
        response = await self._post(images)
        if response.status_code == 200:
            return self._results(response, len(images))
        code, message = _error_of(response)
        if response.status_code in RETRIED_STATUSES:
            self.last_failure = f"{response.status_code} {code}: {message}"
            log.warning(
                "gave up on %d image(s) after %d retries: %s",
                len(images),
                self.retries,
                self.last_failure,
            )
            return [None] * len(images)
        if code in IMAGE_FAULTS:
            if len(images) == 1:
                return [Rejected(response.status_code, code, message)]
            if code == "payload_too_large" and not self.split_warned:
                self.split_warned = True
                log.warning("%s; sending such batches one image at a time", message)
            # One image spoils a multi-image request: send each alone to find which.
            return [answer for image in images for answer in await self.send([image])]
        hint = (
            "; pass --api-key or set RESNET_CLIENT_API_KEY" if response.status_code == 401 else ""
        )
        raise Fatal(
            f"the server refused the request: {message} ({response.status_code} {code}){hint}",
            EXIT_USAGE,
        )

    async def _post(self, images: list[tuple[str, bytes]]) -> httpx.Response:
        """The first answer that is not worth retrying, or the last one."""
        body, kind = (images[0][1], OCTET_STREAM) if len(images) == 1 else _multipart(images)
        attempt = 0
        while True:
            last = attempt == self.retries
            try:
                response = await self.client.post(
                    self.route, params=self.params, content=body, headers={"Content-Type": kind}
                )
            except httpx.TransportError as exc:
                if last:
                    raise Fatal(
                        f"lost the server at {self.client.base_url}: {describe(exc)}",
                        EXIT_UNREACHABLE,
                    ) from None
                wait, why = _backoff(attempt), describe(exc)
            else:
                if last or response.status_code not in RETRIED_STATUSES:
                    return response
                wait = _retry_after(response) or _backoff(attempt)
                why = f"{response.status_code} {_error_of(response)[0]}"
            attempt += 1
            self.retried += 1
            log.info("%s; retry %d of %d in %.1f s", why, attempt, self.retries, wait)
            await asyncio.sleep(wait)

    def _results(self, response: httpx.Response, count: int) -> list[Answer]:
        try:
            body = response.json()
            results: list[dict[str, Any]] = body["results"]
            model, version = body["model"], body["version"]
        except (ValueError, KeyError, TypeError):
            raise Fatal(
                f"{response.url} answered 200 with a body that is not resnet-serve's; check --url",
                EXIT_UNREACHABLE,
            ) from None
        if len(results) != count:
            raise Fatal(f"sent {count} images, got {len(results)} results", EXIT_UNREACHABLE)
        return [{"model": model, "version": version, **result} for result in results]


def _multipart(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of ``file`` parts, and its Content-Type.

    Built as one bytes object, sent in one write: httpx's own encoder writes each part's
    headers and content to the socket separately, several small writes per image.
    """
    boundary = os.urandom(16).hex()  # as httpx does: never found in the data by chance
    body = bytearray()
    for i, (_, data) in enumerate(images):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}"'
        body += f"{head}\r\nContent-Type: {OCTET_STREAM}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error body; a proxy's page or plain text, shortened."""
    try:
        error = response.json()["error"]
        return str(error["code"]), " ".join(str(error["message"]).split())
    except (ValueError, KeyError, TypeError):
        return "", " ".join(response.text.split())[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    """The server's ``Retry-After`` in seconds (a number; HTTP dates are not used here)."""
    try:
        wait = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    # At least what the server asks, plus up to a tenth so that workers do not retry in step.
    return min(max(wait, 0.0) * (1 + random.random() / 10), MAX_WAIT_S)


def _backoff(attempt: int) -> float:
    """0.25 s, 0.5 s, 1 s, ... with jitter, capped."""
    return min(0.25 * 2**attempt * random.uniform(0.75, 1.25), MAX_WAIT_S)


def describe(exc: httpx.TransportError) -> str:
    """A transport error in a few words, e.g. ``connection refused``, from its root cause."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within --timeout ({type(exc).__name__})"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:  # gaierror's errno is negative
            return (os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)).lower()
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(exc).split()) or type(exc).__name__
