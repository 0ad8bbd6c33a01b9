"""Every setting of the service, in one validated class.

Values come from, highest priority first: command-line flags (``python -m service``),
environment variables prefixed ``RESNET_SERVE_`` (``RESNET_SERVE_PORT=9000``), then the
defaults below. A bad value stops the service at start-up with a message that names the
setting, the environment variable and the value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RESNET_SERVE_"

# Short names a user types; full ONNX Runtime provider names are accepted as well.
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


ProviderOptions = dict[str, dict[str, str | int | float | bool]]
"""Execution provider options by provider ('cuda', 'tensorrt' or a full provider name)."""

SECRETS = frozenset({"api_keys"})
"""Settings whose values are never printed, not even in a validation error."""


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
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Front-end processes sharing the port, each doing HTTP, limits and "
        "decoding. 1: one process does everything. More: the models run in one engine "
        "process that batches images from all of them (Linux).",
    )
    shared_memory_mb: int = Field(
        default=256,
        ge=1,
        description="Shared memory per front-end process for images on their way to the "
        "engine and their outputs (workers > 1); a request that finds it full gets 503.",
    )
    provider_options: Annotated[ProviderOptions, NoDecode] = Field(
        default_factory=dict,
        description="ONNX Runtime execution provider options as JSON, by provider, e.g. "
        '\'{"cuda": {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}, "tensorrt": '
        '{"trt_fp16_enable": true, "trt_engine_cache_enable": true}}\' (ONNX Runtime\'s own '
        "option names; a model's config.json may add its own).",
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
        "load, while the engine is busy), and a lone image in the thread that decoded it; "
        "a few ms helps on a GPU.",
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="Images waiting per model version; beyond it requests get 503.",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime threads per engine run (0: the CPUs this process may use, "
        "after its affinity and cgroup quota, divided among a model's instances).",
    )
    instances: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Batches of one model version that may run at once, each in its own "
        "engine thread on one shared session (Triton's instance_group count); a model's "
        "config.json may set its own.",
    )
    inter_op_threads: int = Field(default=1, ge=0, description="ONNX Runtime inter-op threads.")
    allow_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's threads spin between the operators of a run (never "
        "between runs): a faster run alone, but under load they take the CPU that HTTP and "
        "decoding need.",
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
    max_concurrent_requests: int = Field(
        default=128,
        ge=1,
        description="POST requests handled at once (reading, decoding, queued or running); "
        "beyond it 503 with Retry-After before the body is read, so memory stays under "
        "about this many times max_body_bytes.",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Longest a request may take from arrival to answer (504 beyond); a client "
        "may ask for less with the X-Request-Timeout header, in seconds.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On SIGTERM, how long requests in flight and queued may take to finish "
        "before they are cancelled.",
    )
    require_gpu: bool = Field(
        default=False,
        description="Refuse to start, and fail a model, when CUDA is not usable instead of "
        "falling back to CPU with a warning.",
    )
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="API keys, comma-separated; when set, every route but health, readiness, "
        "metrics and the docs needs 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
    )
    model_control: Literal["none", "explicit"] = Field(
        default="none",
        description="'none': the models under models_dir load at start and the v2 "
        "repository API may only list them (load and unload answer 403); 'explicit': "
        "POST /v2/repository/models/NAME/load and /unload change what is served (turn "
        "api_keys on with it).",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Origins that browsers may call the API from, comma-separated ('*' for "
        "any); empty turns CORS off.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and uvicorn."
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per request (uvicorn's access log; costs throughput).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines as text, or as one JSON object per line (with the request ID).",
    )

    @field_validator("provider_options", mode="before")
    @classmethod
    def _parse_json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        return value

    @field_validator("provider_options")
    @classmethod
    def _known_providers(cls, value: ProviderOptions) -> ProviderOptions:
        for name in value:
            if name not in PROVIDER_ALIASES and not name.endswith("ExecutionProvider"):
                raise ValueError(
                    f"unknown provider {name!r}; use {', '.join(repr(a) for a in PROVIDER_ALIASES)}"
                    " or an ONNX Runtime provider name"
                )
        return value

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
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

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in value:
            secret = key.get_secret_value()
            if not secret.isascii() or not secret.isprintable() or " " in secret:
                raise ValueError("API keys are printable ASCII without spaces or commas")
        return value

    @field_validator("require_gpu")
    @classmethod
    def _gpu_needs_a_gpu_provider(cls, value: bool, info: ValidationInfo) -> bool:
        providers = info.data.get("providers", ())
        if value and all(p in ("cpu", "CPUExecutionProvider") for p in providers):
            raise ValueError(
                f"require_gpu is on but providers is {','.join(providers)!r}; use 'auto' or 'cuda'"
            )
        return value

    @field_validator("default_model")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    def intra_op_threads_for(self, instances: int) -> int:
        """ONNX Runtime threads per run for a model with ``instances`` concurrent runs.

        Always an explicit count: left at 0, ONNX Runtime counts the host's physical cores,
        not a container's share, and pins its threads to cores, so a thread stuck behind
        the event loop or a decoder on its core holds up every operator of the run
        (measured: ResNet-50's p99 with one client 50-58 ms pinned, 44 ms not).
        """
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, available_cpus() // instances)

    def effective_preprocess_threads(self) -> int:
        """The decode pool's size: the setting, or one thread per CPU this process may use."""
        return self.preprocess_threads or available_cpus()

    def as_rows(self) -> list[tuple[str, str, str]]:
        """(setting, environment variable, value) for the start-up banner."""
        return [
            (name, ENV_PREFIX + name.upper(), _show(getattr(self, name)))
            for name in type(self).model_fields
        ]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota, where Docker's ``--cpus`` and Kubernetes' CPU limits land."""
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
"""cgroup v1's CPU controller (older hosts): ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``."""


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX, v1_cpu: Path = CGROUP_V1_CPU) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota if any."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cpu_max, v1_cpu)
    return max(1, min(cpus, quota)) if quota is not None else cpus


def cgroup_cpu_quota(cpu_max: Path = CGROUP_CPU_MAX, v1_cpu: Path = CGROUP_V1_CPU) -> int | None:
    """CPUs a cgroup quota allows (rounded up), or None when there is no quota.

    cgroup v2's ``cpu.max`` holds "QUOTA PERIOD" in microseconds, or "max PERIOD" without
    a limit; where it is absent, cgroup v1's ``cpu.cfs_quota_us`` (-1 without a limit)
    and ``cpu.cfs_period_us`` say the same.
    """
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (v1_cpu / "cpu.cfs_quota_us").read_text().strip()
            period = (v1_cpu / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except ValueError:
        return None


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value) if value else ""
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
            shown = "(hidden)" if name.split(".")[0] in SECRETS else repr(error.get("input"))
            lines.append(f"  {name} ({env}) = {shown}: {error['msg']}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from exc
