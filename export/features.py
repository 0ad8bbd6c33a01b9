"""Logits and embedding from one forward pass, for any classifier.

The embedding is the input of the final ``nn.Linear`` (the globally pooled features for
every ResNet), or the output of a layer the user names. A :class:`_Tap` takes the place of
that layer, records what flows through it and hands it on unchanged, so the model's own
``forward`` runs exactly as written and the exporter traces one pass with two outputs.
A timm model takes its embedding from timm's own contract instead (:class:`TimmOutputs`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from export.errors import ExportError


class _Tap(nn.Module):
    """Wraps ``inner`` and keeps its input (``side="input"``) or output, flattened to [N, D]."""

    def __init__(self, inner: nn.Module, side: Literal["input", "output"]) -> None:
        super().__init__()
        self.inner = inner
        self.side = side
        # A list, not a tensor attribute: torch.export warns about (and may one day reject)
        # tensors assigned to module attributes during tracing.
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        self.seen.append(torch.flatten(x if self.side == "input" else out, 1))
        return out


class WithEmbedding(nn.Module):
    """``forward(input) -> (logits, embedding)``; see the module docstring."""

    def __init__(self, model: nn.Module, *, layer: str | None = None) -> None:
        super().__init__()
        if layer is None:
            layer = final_linear(model)
            side: Literal["input", "output"] = "input"
        else:
            side = "output"
        try:
            target = model.get_submodule(layer)
        except AttributeError as exc:
            names = ", ".join(n for n, _ in model.named_children())
            raise ExportError(
                f"the model has no layer {layer!r} (its top-level layers: {names})"
            ) from exc
        self.layer = layer
        self.tap = _Tap(target, side)
        parent_name, _, leaf = layer.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, self.tap)
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.tap.seen.clear()
        logits = self.model(x)
        if len(self.tap.seen) != 1:
            raise ExportError(
                f"layer {self.layer!r} ran {len(self.tap.seen)} times in one forward(); "
                "the embedding layer must run exactly once (name another with --embedding-layer)"
            )
        embedding = self.tap.seen.pop()
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = f"shape {list(logits.shape)}" if isinstance(logits, Tensor) else type(logits)
            raise ExportError(f"forward() must return one [N, classes] tensor, got {got}")
        return logits, embedding


def final_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` registered in ``model`` (``fc`` for every ResNet)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ExportError(
            "the model has no nn.Linear layer to take the embedding from; "
            "name the embedding layer with --embedding-layer"
        )
    return names[-1]


class FlipAverage(nn.Module):
    """Test-time augmentation: outputs averaged over the image and its horizontal mirror.

    Both go through the model as one batch of 2N. With the default embedding (the input of
    the final linear layer), averaging the logits equals classifying the averaged
    embedding, so the two outputs stay consistent.
    """

    def __init__(self, model: nn.Module) -> None:
        """``model`` returns ``(logits, embedding)``, as :class:`WithEmbedding` does."""
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        logits, embedding = self.model(torch.cat([x, x.flip(3)]))
        return (logits[:n] + logits[n:]) / 2, (embedding[:n] + embedding[n:]) / 2


class TimmOutputs(nn.Module):
    """``forward(input) -> (logits, embedding)`` through timm's own classifier contract.

    The embedding is ``forward_head(features, pre_logits=True)``: the pooled, flattened
    features that feed the classifier, whatever the classifier is (``nn.Linear`` for most,
    a 1x1 ``Conv2d`` for ResNetV2, so "the input of the last linear layer" does not apply).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for method in ("forward_features", "forward_head"):
            if not callable(getattr(model, method, None)):
                raise ExportError(
                    f"{type(model).__name__} has no {method}(): not a timm classifier "
                    "(name the embedding layer with --embedding-layer)"
                )
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        timm_model: Any = self.model
        features = timm_model.forward_features(x)
        embedding = torch.flatten(timm_model.forward_head(features, pre_logits=True), 1)
        logits = timm_model.forward_head(features)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = f"shape {list(logits.shape)}" if isinstance(logits, Tensor) else type(logits)
            raise ExportError(f"forward_head() must return one [N, classes] tensor, got {got}")
        return logits, embedding
