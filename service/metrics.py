"""Prometheus metrics: one registry per app, so that tests can build several apps.

Request metrics are recorded by a small pure-ASGI middleware (no per-request task or body
buffering, unlike Starlette's ``BaseHTTPMiddleware``); it labels by the matched route
template and by the model a handler resolved, so label values never come from raw URLs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "resnet_serve"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests", ["route", "model", "status"], registry=r
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Error responses by error code",
            ["route", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to response",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(f"{PREFIX}_images", "Images accepted", ["model"], registry=r)
        self.preprocess = Histogram(
            f"{PREFIX}_preprocess_seconds",
            "Decode and preprocess time per request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time an image waited for its batch to start",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{PREFIX}_inference_seconds",
            "Engine time per batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per engine run (the batches actually formed)",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_sources = Histogram(
            f"{PREFIX}_batch_sources",
            "Front-end processes whose images share a batch (always 1 with one worker)",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Gauges say how processes combine under --workers (prometheus_client's multiprocess
        # mode): the engine process alone sets these, and a dead one's values go with it.
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Images waiting for a batch",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Inference requests being read, decoded, queued or run",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model version is loaded and warm",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def exposition(self) -> bytes:
        """The text a scrape gets: this app's metrics, or every process's under --workers.

        With several processes (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor) each
        writes its values to files there, and any front end's scrape adds them all up.
        """
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def batch_observer(self, model: str, version: int) -> BatchMetrics:
        """The batcher's view of the metrics for one model version."""
        return BatchMetrics(self, model, str(version))

    def observe_request(
        self, route: str, model: str, status: int, seconds: float, code: str | None
    ) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(seconds)
        if code is not None:
            self.errors.labels(route, model, code).inc()


class BatchMetrics:
    """Label-bound children for one model version (looked up once, not per batch)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._wait = metrics.queue_wait.labels(model, version)
        self._inference = metrics.inference.labels(model, version)
        self._size = metrics.batch_size.labels(model, version)
        self._depth = metrics.queue_depth.labels(model, version)
        self._sources = metrics.batch_sources.labels(model, version)

    def batch_done(
        self, size: int, queue_waits: Sequence[float], run_seconds: float, sources: int
    ) -> None:
        self._size.observe(size)
        self._sources.observe(sources)
        self._inference.observe(run_seconds)
        for wait in queue_waits:
            self._wait.observe(wait)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)


class MetricsMiddleware:
    """Counts every HTTP request by route template, model and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            state: dict[str, Any] = scope.get("state") or {}
            self.metrics.observe_request(
                getattr(route, "path", "unmatched"),
                state.get("model", ""),
                status,
                time.perf_counter() - start,
                state.get("error_code"),
            )
