"""Errors a request can end in, each with its HTTP status and a stable code.

Every one reaches the client as ``{"error": {"code": "...", "message": "..."}}`` (see
``app.py``), or under ``/v2`` as the Open Inference Protocol's ``{"error": "..."}``
(:func:`error_body`); the message says what was wrong and what is allowed. Lower layers
(preprocessing, the batcher, the registry) raise these directly, so that the routes stay
free of error translation.
"""

from __future__ import annotations

import copy

V2_PREFIX = "/v2"
"""Paths of the Open Inference Protocol (KServe v2), whose error body is its own."""


def error_body(path: str, code: str, message: str) -> dict[str, object]:
    """The JSON error body for a request to ``path``."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


class ServiceError(Exception):
    """Base class: an error with an HTTP status and a machine-readable code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def with_context(self, prefix: str) -> ServiceError:
        """The same error with ``prefix`` before its message (e.g. which image failed)."""
        other = copy.copy(self)
        other.message = f"{prefix}: {self.message}"
        other.args = (other.message,)
        return other

    def with_status(self, status: int) -> ServiceError:
        """The same error answered with another HTTP status (a protocol may map codes)."""
        other = copy.copy(self)
        other.status = status
        return other

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON error body."""
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class ModelRequired(ServiceError):
    status = 400
    code = "model_required"


class InvalidParameter(ServiceError):
    status = 422
    code = "invalid_parameter"


class MissingImage(ServiceError):
    status = 422
    code = "missing_image"


class InvalidImage(ServiceError):
    """The bytes look like an image format we know but cannot be decoded (corrupt, truncated)."""

    status = 422
    code = "invalid_image"


class UnsupportedImage(ServiceError):
    """The bytes are not an image format Pillow can identify."""

    status = 415
    code = "unsupported_image"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class Forbidden(ServiceError):
    """A route the server's configuration turns off (e.g. model control)."""

    status = 403
    code = "forbidden"


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"


class ModelNotReady(ServiceError):
    status = 503
    code = "model_not_ready"


class Overloaded(ServiceError):
    """The model's queue is full: retry shortly."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ShuttingDown(ServiceError):
    status = 503
    code = "shutting_down"


class DeadlineExceeded(ServiceError):
    """The request could not finish before its deadline (``X-Request-Timeout``)."""

    status = 504
    code = "deadline_exceeded"


class Unauthorized(ServiceError):
    """API keys are configured and the request carries none of them."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="resnet-serve"'})


class InferenceFailed(ServiceError):
    """The engine failed on the batch this request was part of."""

    status = 500
    code = "inference_failed"


class ClientDisconnected(ServiceError):
    """The client went away before its result was ready (nginx's 499; never sent)."""

    status = 499
    code = "client_disconnected"
