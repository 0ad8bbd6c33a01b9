"""Every setting of the service, in one validated class.

Values come from, highest priority first: command-line flags (``python -m service``),
environment variables prefixed ``RESNET_SERVE_`` (``RESNET_SERVE_PORT=9000``), then the
defaults below. A bad value stops the service at start-up with a message that names the
setting, the environment variable and the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RESNET_SERVE_"

# Short names a user types; full ONNX Runtime provider names are accepted as well.
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class Settings(BaseSettings):
    """Configuration of one service process."""

    # Empty variables count as unset (compose and Kubernetes often pass NAME= through).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    host: str = Field(default="0.0.0.0", description="Interface to listen on.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    models_dir: Path = Field(
        default=Path("models"), description="Model repository: <dir>/<name>/<version>/model.onnx."
    )
    default_model: str | None = Field(
        default=None, description="Model used when a request names none (default: the only model)."
    )
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("auto",),
        description="ONNX Runtime providers, comma-separated, in order of preference: "
        "'auto' (CUDA when usable, else CPU), 'cuda', 'cpu' or full provider names.",
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Largest batch per engine run."
    )
    max_delay_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=10_000.0,
        description="How long a batch waits for more images, from its first image's arrival. "
        "0 runs whatever is queued as soon as the engine is free (batches still form under "
        "load, while the engine is busy); a few ms helps on a GPU.",
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="Images waiting per model version; beyond it requests get 503.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime threads per engine run (0: one per physical core).",
    )
    inter_op_threads: int = Field(default=1, ge=0, description="ONNX Runtime inter-op threads.")
    allow_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's idle threads spin: lower latency for a dedicated "
        "engine, but they steal the CPU that HTTP and decoding need.",
    )
    preprocess_threads: int = Field(
        default=0, ge=0, description="Threads decoding and preprocessing images (0: one per CPU)."
    )
    jpeg_draft: bool = Field(
        default=True,
        description="Decode large JPEGs at a reduced scale (DCT scaling) when it suffices.",
    )
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="Largest request body, in bytes (413 beyond)."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest image, in pixels, checked before decoding (413).",
    )
    max_images_per_request: int = Field(
        default=64, ge=1, description="Most images in one request (413 beyond)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and uvicorn."
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per request (uvicorn's access log; costs throughput).",
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one provider, e.g. 'auto' or 'cpu'")
        for name in value:
            if (
                name != "auto"
                and name not in PROVIDER_ALIASES
                and not name.endswith("ExecutionProvider")
            ):
                raise ValueError(
                    f"unknown provider {name!r}; use 'auto', "
                    f"{', '.join(repr(a) for a in PROVIDER_ALIASES)} "
                    "or an ONNX Runtime provider name such as 'CUDAExecutionProvider'"
                )
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' cannot be combined with other providers")
        return value

    @field_validator("default_model")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    def effective_preprocess_threads(self) -> int:
        """The decode pool's size: the setting, or one thread per CPU."""
        return self.preprocess_threads or (os.cpu_count() or 1)

    def as_rows(self) -> list[tuple[str, str, str]]:
        """(setting, environment variable, value) for the start-up banner."""
        return [
            (name, ENV_PREFIX + name.upper(), _show(getattr(self, name)))
            for name in type(self).model_fields
        ]


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class SettingsError(ValueError):
    """Settings that failed validation, explained per setting."""


def load_settings(**overrides: object) -> Settings:
    """Build :class:`Settings` from the environment plus ``overrides`` (e.g. CLI flags).

    Raises :class:`SettingsError` whose message names each bad setting, its environment
    variable and the offending value.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            env = ENV_PREFIX + name.upper()
            lines.append(f"  {name} ({env}) = {error.get('input')!r}: {error['msg']}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from exc
