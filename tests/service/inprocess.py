"""The real app in process: ``create_app`` + its lifespan, spoken to through httpx's ASGI
transport (no sockets), for tests of the middleware and error paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.settings import Settings


def model_repo(root: Path, model_file: Path, name: str = "cifar", **config: object) -> Path:
    """``root/<name>/1/model.onnx`` (a link to ``model_file``), with an optional config.json."""
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").symlink_to(model_file)
    if config:
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def build_app(models: Path, **settings: object) -> FastAPI:
    """``create_app`` with test-sized batches (warm-up at 1, 2 and 4)."""
    return create_app(Settings(models_dir=models, max_batch_size=4, **settings))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    app: FastAPI, *, loaded: bool = True, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` inside its lifespan, once every model has loaded or failed."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        if loaded:
            for _ in range(1500):  # an observable condition, polled: no model still loading
                states = (await client.get("/readyz")).json()["models"]
                if states and "loading" not in states.values():
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"still loading: {(await client.get('/readyz')).text}")
        yield client


def serving(models: Path, *, loaded: bool = True, **settings: object) -> Any:
    """``running(build_app(models, **settings))``."""
    return running(build_app(models, **settings), loaded=loaded)


def png(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()
