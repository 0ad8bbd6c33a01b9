"""A front end's registry (``--workers`` > 1): the engine process's model list, mirrored.

The routes and the data plane use it exactly as they use :class:`ModelRegistry`; what
differs is where the models live. Loading, unloading and draining happen in the engine
process; this registry applies the ``models`` messages the engine sends whenever its
list changes, and forwards load and unload requests to it. While the engine process is
away (starting or restarting) the server is not ready and requests get 503.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.engine_client import EngineClient, EngineUnavailable, RemoteBatcher, RemoteEngine
from service.ipc import Message
from service.metrics import Metrics
from service.preprocess import Preprocessor
from service.registry import (
    BatchingSettings,
    Loaded,
    ModelRegistry,
    ServedModel,
    State,
)
from service.settings import Settings

log = logging.getLogger(__name__)


class RemoteRegistry(ModelRegistry):
    """The models of the engine process at ``engine_path``, as this front end serves them."""

    def __init__(self, settings: Settings, metrics: Metrics, engine_path: str) -> None:
        super().__init__(settings, metrics)
        self.client = EngineClient(
            engine_path, settings.shared_memory_mb * 1024 * 1024, self.apply, self.quiesce
        )
        self._quiescing: set[str] = set()

    async def load_all(self) -> None:
        """Connect to the engine process and follow its model list (until shutdown)."""
        await self.client.run()

    async def load(self, name: str) -> None:
        await self.client.control("load", name)

    async def unload(self, name: str) -> None:
        await self.client.control("unload", name)

    async def close(self) -> None:
        """Nothing to drain here: requests in flight have finished (uvicorn waited)."""

    def resolve(self, name: str | None, version: int | None) -> ServedModel:
        if not self.client.connected:
            raise EngineUnavailable("the engine process is not connected; retry shortly")
        return super().resolve(name, version)

    def readiness(self) -> tuple[bool, str]:
        if not self.client.connected:
            return False, "waiting for the engine process"
        return super().readiness()

    async def quiesce(self, name: str) -> None:
        """Stop routing to ``name`` and wait for its requests in flight here (the engine
        is about to unload or replace it)."""
        self._quiescing.add(name)
        versions = self.models.pop(name, {})
        self._changed()
        for served in versions.values():
            await served.wait_idle()

    def apply(self, message: Message) -> None:
        """Take the engine's model list; versions whose engine did not change are kept."""
        self.scanned = message["scanned"]
        self.repository_error = message["repository_error"]
        self._marked_default = set(message["marked_default"])
        self._quiescing = set(message.get("quiescing", ()))
        models: dict[str, dict[int, ServedModel]] = {}
        for entry in message["models"]:
            if entry["name"] in self._quiescing:
                continue  # being unloaded or replaced: no new requests
            old = self.models.get(entry["name"], {}).get(entry["version"])
            served = self._served(entry, old)
            models.setdefault(served.name, {})[served.version] = served
        self.models = models
        self._changed()

    def _served(self, entry: Message, old: ServedModel | None) -> ServedModel:
        state = State(entry["state"])
        sha = entry.get("engine", {}).get("sha256")
        if (
            old is not None
            and old.state is state
            and (old.loaded is None or old.loaded.engine.sha256 == sha)
        ):
            old.reason = entry["reason"]
            return old
        served = ServedModel(
            entry["name"],
            entry["version"],
            Path(entry["path"]),
            BatchingSettings(**entry["batching"]),
        )
        served.warmup_seconds = entry["warmup_seconds"]
        if state is State.READY:
            engine = RemoteEngine.from_message(entry["path"], entry["engine"])
            s = self.settings
            preprocessor = Preprocessor(
                engine.card.preprocessing, max_pixels=s.max_image_pixels, draft=s.jpeg_draft
            )
            batcher = RemoteBatcher(self.client, served.name, served.version, engine.layout)
            served.ready(Loaded(engine, preprocessor, batcher))
        else:
            served.state, served.reason = state, entry["reason"]
        return served
