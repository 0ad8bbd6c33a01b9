"""One ONNX Runtime session for one model file, and the checks that it fits the contract.

The engine runs a whole batch: float32 [N, 3, H, W] in, and ``logits`` [N, C],
``probabilities`` [N, C] (softmax), ``ranking`` [N, C] (class indices, most probable
first) and ``embedding`` [N, D] out. Softmax and ranking are computed here, once per
batch in the engine's thread, rather than per request on the event loop. The engine
knows nothing about HTTP or queues.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.metadata import (
    EMBEDDING_NAME,
    GRAPH_OUTPUTS,
    INPUT_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    RANKING_NAME,
    MetadataError,
    ModelCard,
)
from service.settings import PROVIDER_ALIASES

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(RuntimeError):
    """A model file that cannot be served: unreadable, no model card, wrong inputs/outputs."""


@dataclass(frozen=True, slots=True)
class ThreadSettings:
    """ONNX Runtime CPU thread options (see ``Settings``)."""

    intra_op: int = 0
    inter_op: int = 1
    allow_spinning: bool = False


def resolve_providers(requested: Sequence[str], available: Iterable[str]) -> list[str]:
    """Provider names to ask ONNX Runtime for, best first.

    'auto' means CUDA when this onnxruntime build has it, else CPU. The CPU provider is
    always appended last, so that a node or a device CUDA cannot take still runs.
    """
    available = list(available)
    if tuple(requested) == ("auto",):
        wanted = [CUDA, CPU] if CUDA in available else [CPU]
    else:
        wanted = [PROVIDER_ALIASES.get(name, name) for name in requested]
    missing = [name for name in wanted if name not in available]
    if missing:
        log.warning(
            "providers %s are not available in this onnxruntime build (available: %s)",
            missing,
            available,
        )
    chosen = [name for name in wanted if name in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def provider_options(
    providers: Sequence[str], *layers: Mapping[str, Mapping[str, object]]
) -> list[dict[str, str]]:
    """ONNX Runtime's ``provider_options``: one dict per provider in ``providers``.

    Each layer maps a provider (an alias such as 'cuda' or a full name) to ONNX Runtime's
    own option names; later layers win option by option (the service's settings, then a
    model's config.json). Values become the strings ONNX Runtime parses (booleans as
    '1'/'0'), passed to ONNX Runtime as they are: its documentation lists each provider's.
    """
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for name, options in layer.items():
            target = merged.setdefault(PROVIDER_ALIASES.get(name, name), {})
            for key, value in options.items():
                target[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return [merged.get(name, {}) for name in providers]


def cuda_missing(available: Iterable[str]) -> str | None:
    """Why this onnxruntime build cannot run CUDA at all, or None when it has the provider."""
    available = list(available)
    if CUDA in available:
        return None
    return (
        f"this onnxruntime build has no CUDA provider (available: {', '.join(available)}); "
        "install onnxruntime-gpu (the 'gpu' extra) where an NVIDIA GPU and CUDA are present"
    )


def has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI; None on other machines (ARM), where U8S8 is exact.

    Without VNNI, x86's U8S8 integer kernels can saturate on 8-bit weights (ONNX Runtime's
    quantization docs), which is why INT8 variants use 7-bit weights unless told otherwise.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


class Engine:
    """An ONNX Runtime session for a model exported by ``python -m export``."""

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str] = ("auto",),
        threads: ThreadSettings | None = None,
        require_gpu: bool = False,
        options: Sequence[Mapping[str, Mapping[str, object]]] = (),
    ) -> None:
        self.path = path
        try:
            data = path.read_bytes()  # read once: hashed here, parsed by ORT from memory
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        self.sha256 = hashlib.sha256(data).hexdigest()
        threads = threads or ThreadSettings()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads.intra_op
        session_options.inter_op_num_threads = threads.inter_op
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if threads.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        # Spin between the operators of a run (a parked thread is slow to wake), never
        # between runs: idle cores are left to decoding and the event loop.
        session_options.add_session_config_entry("session.force_spinning_stop", "1")
        available = ort.get_available_providers()
        wanted = resolve_providers(providers, available)
        try:
            self.session = ort.InferenceSession(
                data,
                sess_options=session_options,
                providers=wanted,
                provider_options=provider_options(wanted, *options),
            )
            self.card = ModelCard.from_metadata_props(
                self.session.get_modelmeta().custom_metadata_map
            )
        except MetadataError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelLoadError(f"{path} is not a loadable ONNX model: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        asked_cuda = CUDA in wanted or CUDA in [PROVIDER_ALIASES.get(p, p) for p in providers]
        if self.provider != CUDA and (asked_cuda or require_gpu):
            # ORT falls back to CPU, with only a Python warning, when CUDA cannot start
            # (no device, driver or CUDA/cuDNN libraries): say so, or refuse.
            why = cuda_missing(available) or "CUDA could not be initialised"
            if require_gpu:
                raise ModelLoadError(
                    f"{path}: require_gpu is on, but {why}; the session runs on {self.provider}"
                )
            log.warning("%s: CUDA requested but not usable (%s): running on CPU", path, why)
        elif wanted[0] != self.provider:
            log.warning("%s: asked for %s, running on %s", path, wanted[0], self.provider)
        self.num_classes, self.embedding_dim = self._check_signature()
        self._warn_about_precision()

    def _warn_about_precision(self) -> None:
        """Say when a precision variant runs where it is slow or may be inexact."""
        q = self.card.quantization
        if q is None:
            return
        if q.precision == "fp16" and self.provider == CPU:
            log.warning(
                "%s: an fp16 model on the CPU provider runs slower than its fp32 source; "
                "fp16 is meant for GPUs (serve the fp32 or an int8 variant on CPUs)",
                self.path,
            )
        if q.precision == "int8" and q.reduce_range is False and has_vnni() is False:
            log.warning(
                "%s: int8 with 8-bit weights on an x86 CPU without VNNI may saturate and lose "
                "accuracy; make the variant with --reduce-range on for this CPU",
                self.path,
            )

    @property
    def input_size(self) -> int:
        return self.card.preprocessing.crop

    def _check_signature(self) -> tuple[int, int]:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        size = self.input_size
        if list(inputs) != [INPUT_NAME]:
            raise ModelLoadError(
                f"{self.path}: expected one input {INPUT_NAME!r}, got {list(inputs)}"
            )
        shape = inputs[INPUT_NAME].shape
        if inputs[INPUT_NAME].type != "tensor(float)" or list(shape[1:]) != [3, size, size]:
            raise ModelLoadError(
                f"{self.path}: input must be float32 [N, 3, {size}, {size}] as the model card's "
                f"crop says, got {inputs[INPUT_NAME].type} {shape}"
            )
        for name in GRAPH_OUTPUTS:
            if name not in outputs:
                raise ModelLoadError(f"{self.path}: output {name!r} missing, got {list(outputs)}")
        num_classes = outputs[LOGITS_NAME].shape[1]
        dim = outputs[EMBEDDING_NAME].shape[1]
        if num_classes != self.card.num_classes:
            raise ModelLoadError(
                f"{self.path}: {num_classes} logits but {self.card.num_classes} labels in the card"
            )
        if not isinstance(dim, int):
            raise ModelLoadError(f"{self.path}: embedding width must be static, got {dim!r}")
        return self.card.num_classes, dim

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [N, 3, H, W] -> logits, probabilities, ranking and embedding, a row per input."""
        logits, embedding = self.session.run(list(GRAPH_OUTPUTS), {INPUT_NAME: batch})
        probabilities = softmax(logits.copy())
        return {
            LOGITS_NAME: logits,
            PROBABILITIES_NAME: probabilities,
            # Stable: equal scores keep the lower class index first.
            RANKING_NAME: np.argsort(-probabilities, axis=1, kind="stable"),
            EMBEDDING_NAME: embedding,
        }

    def run_rows(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Stack [3, H, W] rows into one batch and run it (the batcher's entry point)."""
        return self.run(np.stack(rows) if len(rows) > 1 else rows[0][None])

    def warm_up(self, batch_sizes: Iterable[int]) -> float:
        """Run once at each batch size, so that the first requests do not pay for allocation."""
        start = time.perf_counter()
        size = self.input_size
        rng = np.random.default_rng(0)
        for n in sorted(set(batch_sizes)):
            self.run(rng.standard_normal((n, 3, size, size), dtype=np.float32))
        return time.perf_counter() - start


def warmup_sizes(max_batch_size: int) -> list[int]:
    """The sizes warmed up: powers of two below ``max_batch_size``, and that size itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes
