"""The models being served: load, warm up and unload them, and find one for a request.

Each model version gets its own engine, preprocessor and batcher, together or not at all
(:class:`Loaded`). Loading runs in a worker thread, so the HTTP server answers
(``/healthz``, ``/readyz`` 503 "loading") while models load. A model that fails to load
is kept with its reason, for ``/models`` and ``/readyz``; the others keep serving.
``load``/``unload`` also work at run time: unloading stops routing new requests to the
model, waits for the requests already in flight on it (:meth:`ServedModel.in_flight`),
then finishes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.batcher import Batcher
from service.engine import Engine, ThreadSettings, warmup_sizes
from service.errors import ModelNotFound, ModelNotReady, ModelRequired
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.repository import BatchingOverrides, ModelEntry, RepositoryError, scan, scan_model
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine_client import RemoteBatcher, RemoteEngine

log = logging.getLogger(__name__)

UNLOAD_GRACE_S = 30.0
"""How long unloading waits for a model's requests in flight before failing the rest."""


class State(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class BatchingSettings:
    """The batching settings in force for one model (service defaults + config.json)."""

    max_batch_size: int
    max_delay_ms: float
    max_queue_size: int
    instances: int

    @classmethod
    def of(cls, settings: Settings, overrides: BatchingOverrides) -> BatchingSettings:
        """The service's settings with a model's ``config.json`` over them."""
        o, s = overrides, settings
        return cls(
            max_batch_size=o.max_batch_size or s.max_batch_size,
            max_delay_ms=s.max_delay_ms if o.max_delay_ms is None else o.max_delay_ms,
            max_queue_size=o.max_queue_size or s.max_queue_size,
            instances=o.instances or s.instances,
        )


@dataclass(frozen=True)
class Loaded:
    """What a ready model version runs requests with: always all three together.

    In a front-end process (``--workers`` > 1) the engine and batcher are the engine
    process's, seen through :mod:`service.engine_client`.
    """

    engine: Engine | RemoteEngine
    preprocessor: Preprocessor
    batcher: Batcher | RemoteBatcher


@dataclass
class ServedModel:
    """One model version and everything needed to run requests on it.

    A small state machine: LOADING -> READY (with its :class:`Loaded` parts) or FAILED
    (with the reason), and READY -> UNLOADED, which drops the parts. Only the registry
    moves it (:meth:`ready`, :meth:`fail`, :meth:`unloaded`); requests ask for the parts
    with :meth:`require_loaded`, the one place that answers "it was unloaded".
    """

    name: str
    version: int
    path: Path
    batching: BatchingSettings
    state: State = State.LOADING
    reason: str = "queued for loading"
    warmup_seconds: float | None = None
    requests: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    provider_options: dict[str, dict[str, str | int | float | bool]] = field(default_factory=dict)
    """The model's own execution provider options (config.json), over the service's."""
    _loaded: Loaded | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def loaded(self) -> Loaded | None:
        """The engine, preprocessor and batcher while READY, else None (for descriptions)."""
        return self._loaded

    def require_loaded(self) -> Loaded:
        """The parts to run a request with; 503 when the version is not (or no longer) ready."""
        if self._loaded is None:
            what = "was unloaded" if self.state is State.UNLOADED else f"is {self.reason}"
            raise ModelNotReady(f"model {self.name!r} version {self.version} {what}")
        return self._loaded

    def ready(self, loaded: Loaded) -> None:
        """LOADING -> READY."""
        self._loaded, self.state, self.reason = loaded, State.READY, "ready"

    def fail(self, reason: str) -> None:
        """LOADING -> FAILED, keeping why for /models and /readyz."""
        self._loaded, self.state, self.reason = None, State.FAILED, f"failed to load: {reason}"

    def unloaded(self) -> None:
        """READY (or any state) -> UNLOADED: new requests get 503, the parts are released."""
        self._loaded, self.state, self.reason = None, State.UNLOADED, "unloaded"

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request as in flight on this version: unloading waits for it to end."""
        self.begin_request()
        try:
            yield
        finally:
            self.end_request()

    async def wait_idle(self) -> None:
        """Until no request is in flight on this version, for up to ``UNLOAD_GRACE_S``."""
        try:
            await asyncio.wait_for(self.idle.wait(), UNLOAD_GRACE_S)
        except TimeoutError:
            log.warning(
                "%s v%d: %d requests still in flight after %.0f s; letting the version go",
                self.name,
                self.version,
                self.requests,
                UNLOAD_GRACE_S,
            )

    def begin_request(self) -> None:
        """A request is in flight (:meth:`in_flight`, for callers without a block)."""
        self.requests += 1
        self.idle.clear()

    def end_request(self) -> None:
        """The request of the matching :meth:`begin_request` has ended."""
        self.requests -= 1
        if not self.requests:
            self.idle.set()


class ModelRegistry:
    """Every model version the service knows, keyed by name then version."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[int, ServedModel]] = {}
        self._marked_default: set[str] = set()  # config.json says "default": true
        self.repository_error: str | None = None
        self.scanned = False
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a model version is added, changes state or goes."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def marked_default(self) -> frozenset[str]:
        """The models whose config.json says ``"default": true``."""
        return frozenset(self._marked_default)

    async def load_all(self) -> None:
        """Scan the repository and load every version of every model, one after another."""
        async with self._lock:
            await self._load_all()

    async def _load_all(self) -> None:
        try:
            entries = scan(self.settings.models_dir)
        except RepositoryError as exc:
            self.repository_error = str(exc)
            log.warning("%s: serving no models", exc)
            entries = {}
        if not entries and self.repository_error is None:
            self.repository_error = (
                f"no models found under {self.settings.models_dir} "
                f"(expected {self.settings.models_dir}/<name>/<version>/model.onnx)"
            )
            log.warning("%s", self.repository_error)
        for entry in entries.values():
            self._register(entry)
        self.scanned = True
        self._changed()
        for entry in entries.values():
            await self._load_entry(entry)

    async def load(self, name: str) -> None:
        """(Re)load every version of ``name`` from the repository, at run time."""
        async with self._lock:
            model_dir = self.settings.models_dir / name
            entry = scan_model(model_dir) if model_dir.is_dir() else None
            if entry is None:
                raise ModelNotFound(f"no model {name!r} under {self.settings.models_dir}")
            await self._unload(name)
            self._register(entry)
            self._changed()
            await self._load_entry(entry)

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``, finish its queued work, and release its engines."""
        async with self._lock:
            await self._unload(name)

    async def _unload(self, name: str, drain_timeout_s: float | None = None) -> None:
        versions = self.models.pop(name, {})
        if versions:
            self._changed()
        for served in versions.values():
            self.metrics.model_ready.labels(name, str(served.version)).set(0)
            await served.wait_idle()
            if served.loaded is not None:
                await served.loaded.batcher.stop(drain_timeout_s)
            served.unloaded()

    async def close(self) -> None:
        """Unload everything (the app's shutdown): queued work gets ``drain_timeout_s``."""
        async with self._lock:
            for name in list(self.models):
                await self._unload(name, self.settings.drain_timeout_s)

    def resolve(self, name: str | None, version: int | None) -> ServedModel:
        """The ready model version a request asks for; raises 400/404/503 errors otherwise."""
        if name is None:
            name = self._default_name()
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(
                f"unknown model {name!r}; served models: {', '.join(self.models) or 'none'}"
            )
        if version is None:
            version = max(versions)
        served = versions.get(version)
        if served is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version}; versions: "
                + ", ".join(str(v) for v in versions)
            )
        if served.state is not State.READY:
            raise ModelNotReady(f"model {name!r} version {version} is {served.reason}")
        return served

    def default_name(self) -> str | None:
        """The model of requests that name none: the ``default_model`` setting, else the
        model whose config.json says ``"default": true``, else the only model."""
        if self.settings.default_model is not None:
            return self.settings.default_model
        marked = self._marked()
        if len(marked) == 1:
            return marked[0]
        if len(self.models) == 1:
            return next(iter(self.models))
        return None

    def _marked(self) -> list[str]:
        """The served models whose config.json says ``"default": true``."""
        return [name for name in self.models if name in self._marked_default]

    def _default_name(self) -> str:
        name = self.default_name()
        if name is not None:
            return name
        if not self.models:
            raise ModelNotReady(f"no models are served: {self.readiness()[1]}")
        marked = self._marked()
        why = f', and {", ".join(marked)} all say "default": true' if marked else ""
        raise ModelRequired(
            f"several models are served ({', '.join(self.models)}){why}; choose one with ?model="
        )

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready when every model version is loaded and warm."""
        if not self.scanned:
            return False, f"scanning {self.settings.models_dir}"
        if not self.models:
            return False, self.repository_error or "no models are served"
        waiting = [
            f"{s.name} v{s.version}: {s.reason}"
            for versions in self.models.values()
            for s in versions.values()
            if s.state is not State.READY
        ]
        if waiting:
            return False, "; ".join(waiting)
        return True, "all models are ready"

    def _register(self, entry: ModelEntry) -> None:
        o = entry.overrides
        if o.default:
            self._marked_default.add(entry.name)
        else:
            self._marked_default.discard(entry.name)
        batching = BatchingSettings.of(self.settings, o)
        self.models[entry.name] = {
            version: ServedModel(
                entry.name, version, path, batching, provider_options=o.provider_options
            )
            for version, path in entry.versions.items()
        }
        if entry.config_error is not None:
            for served in self.models[entry.name].values():
                self._fail(served, entry.config_error)

    async def _load_entry(self, entry: ModelEntry) -> None:
        for served in list(self.models.get(entry.name, {}).values()):
            if served.state is State.LOADING:
                await self._load_version(served)

    async def _load_version(self, served: ServedModel) -> None:
        s = self.settings
        served.reason = "loading"
        self._changed()
        log.info("loading %s v%d from %s", served.name, served.version, served.path)
        threads = ThreadSettings(
            s.intra_op_threads_for(served.batching.instances), s.inter_op_threads, s.allow_spinning
        )
        try:
            engine = await asyncio.to_thread(
                Engine,
                served.path,
                providers=s.providers,
                threads=threads,
                require_gpu=s.require_gpu,
                options=(s.provider_options, served.provider_options),
            )
            served.reason = "warming up"
            self._changed()
            sizes = warmup_sizes(served.batching.max_batch_size)
            served.warmup_seconds = await asyncio.to_thread(engine.warm_up, sizes)
        except Exception as exc:  # any failure marks this version failed; others keep serving
            log.exception("model %s v%d failed to load", served.name, served.version)
            self._fail(served, str(exc))
            return
        b = served.batching
        batcher = Batcher(
            engine.run_rows,
            name=f"{served.name}:{served.version}",
            max_batch_size=b.max_batch_size,
            max_delay_s=b.max_delay_ms / 1000.0,
            max_queue_size=b.max_queue_size,
            instances=b.instances,
            observer=self.metrics.batch_observer(served.name, served.version),
        )
        batcher.start()
        preprocessor = Preprocessor(
            engine.card.preprocessing, max_pixels=s.max_image_pixels, draft=s.jpeg_draft
        )
        served.ready(Loaded(engine, preprocessor, batcher))
        self.metrics.model_ready.labels(served.name, str(served.version)).set(1)
        self._changed()
        log.info(
            "model %s v%d ready on %s (%d classes, embedding %d, warm-up at batch sizes %s "
            "took %.2f s)",
            served.name,
            served.version,
            engine.provider,
            engine.num_classes,
            engine.embedding_dim,
            sizes,
            served.warmup_seconds,
        )

    def _fail(self, served: ServedModel, reason: str) -> None:
        served.fail(reason)
        self.metrics.model_ready.labels(served.name, str(served.version)).set(0)
        self._changed()
