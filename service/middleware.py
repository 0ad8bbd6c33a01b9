"""Pure-ASGI middleware around every request: its ID, its deadline, and the limits on load.

* :class:`RequestContextMiddleware` gives each request an ID: the client's ``X-Request-ID``
  when it is a sane token, else a new one. It is echoed on every response and set for log
  lines (``service.logs.request_id``).
* :class:`LimitsMiddleware` gives each request a deadline, ``request_timeout_s`` from its
  arrival or less when the client asks through ``X-Request-Timeout`` (seconds). Requests
  with a body (POST) are admitted only while fewer than ``max_concurrent_requests`` are
  being handled (else 503 with ``Retry-After`` before a byte of the body is read), and
  their body is counted as it streams in, chunked or not, multipart or not: past
  ``max_body_bytes`` it is a 413, past the deadline a 504.

Pure ASGI, not Starlette's ``BaseHTTPMiddleware``: no task or body buffering per request.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    DeadlineExceeded,
    InvalidParameter,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    error_body,
)
from service.logs import request_id
from service.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
TIMEOUT_HEADER = "X-Request-Timeout"
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode("latin-1")
_TIMEOUT = TIMEOUT_HEADER.lower().encode("latin-1")
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CORS_REQUEST_HEADERS = (
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "Content-Encoding",
    "Accept",
    REQUEST_ID_HEADER,
    TIMEOUT_HEADER,
    "Inference-Header-Content-Length",
)
"""Request headers a browser may send cross-origin (when CORS is on)."""
CORS_EXPOSED_HEADERS = (REQUEST_ID_HEADER, "Retry-After", "Inference-Header-Content-Length")
"""Response headers a browser script may read cross-origin."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a (lower-case) request header, or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def state(scope: Scope) -> dict[str, Any]:
    """The per-request state dict that Starlette's ``request.state`` reads."""
    value: dict[str, Any] = scope.setdefault("state", {})
    return value


async def send_error(scope: Scope, send: Send, error: ServiceError) -> None:
    """Answer with ``error``'s JSON body, from a middleware (before any route ran)."""
    state(scope)["error_code"] = error.code  # for the request metrics
    body = json.dumps(error_body(scope["path"], error.code, error.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    for name, value in error.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def deadline_of(request: Request) -> float | None:
    """The request's deadline on the event loop's clock (None outside the middleware)."""
    deadline: float | None = request.scope.get("state", {}).get("deadline")
    return deadline


def check_deadline(request: Request, stage: str) -> float | None:
    """The deadline, after checking that it has not passed (504 if it has)."""
    deadline = deadline_of(request)
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        raise deadline_exceeded(request.scope, stage)
    return deadline


def deadline_exceeded(scope: Scope, stage: str) -> DeadlineExceeded:
    timeout = state(scope).get("timeout_s")
    return DeadlineExceeded(
        f"the request ran out of time {stage} (its deadline was {timeout:g} s after arrival; "
        f"ask for up to the server's limit with the {TIMEOUT_HEADER} header)"
    )


class RequestContextMiddleware:
    """``X-Request-ID``: the client's (if sane) or a new one, on the response and in logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, _REQUEST_ID)
        raw = given if given is not None and _SANE_ID.fullmatch(given) else None
        if raw is None:
            # 128 random bits, as a UUID4 has, without uuid4's os.urandom system call
            # per request (a sixth of the event loop's time in a sandboxed kernel).
            raw = b"%032x" % random.getrandbits(128)
        value = raw.decode("latin-1")
        state(scope)["request_id"] = value
        # Not reset afterwards: each request runs in its own task (its own context), and
        # the handler of unhandled errors, outside all middleware, still logs with it.
        request_id.set(value)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, raw)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class LimitsMiddleware:
    """Deadline per request, admission control and a streaming body-size limit."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.timeout_s = settings.request_timeout_s
        self.max_body = settings.max_body_bytes
        self.max_active = settings.max_concurrent_requests
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        try:
            timeout = self._timeout(scope)
        except ServiceError as exc:
            await send_error(scope, send, exc)
            return
        state(scope).update(deadline=loop.time() + timeout, timeout_s=timeout)
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_active:
            await send_error(
                scope,
                send,
                Overloaded(
                    f"the service is already handling {self.active} requests "
                    f"(max_concurrent_requests); retry shortly"
                ),
            )
            return
        self.active += 1
        try:
            await self.app(scope, self._limited(scope, receive), send)
        finally:
            self.active -= 1

    def _timeout(self, scope: Scope) -> float:
        raw = header(scope, _TIMEOUT)
        if raw is None:
            return self.timeout_s
        try:
            asked = float(raw)
        except ValueError:
            asked = math.nan
        if not (math.isfinite(asked) and asked > 0):
            shown = raw.decode("latin-1")[:40]
            raise InvalidParameter(
                f"{TIMEOUT_HEADER} must be a number of seconds > 0 (at most "
                f"{self.timeout_s:g} are granted), got {shown!r}"
            )
        return min(asked, self.timeout_s)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """``receive`` that counts body bytes and stops at the size limit or the deadline."""
        deadline: float = state(scope)["deadline"]
        received = 0
        finished = False

        async def limited_receive() -> Message:
            nonlocal received, finished
            if finished:  # after the body: the disconnect watch of the routes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # no task per chunk, as wait_for makes
                    message = await receive()
            except TimeoutError:
                raise deadline_exceeded(scope, "while its body was being received") from None
            if message["type"] != "http.request":
                finished = True
                return message
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise PayloadTooLarge(
                    f"the request body is over {self.max_body} bytes (max_body_bytes); "
                    f"at most {self.max_body} bytes are allowed"
                )
            finished = not message.get("more_body", False)
            return message

        return limited_receive
