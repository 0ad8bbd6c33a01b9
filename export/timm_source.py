"""timm models: ``timm/<model name>`` (random, a checkpoint, or a pretrained tag) and timm
Hub folders (what ``timm.models.save_for_hf`` writes and ``hf download`` fetches).

The preprocessing is timm's own eval transform as ``timm.data.resolve_model_data_config``
resolves it: ``Resize(floor(size / crop_pct))`` (shorter side) -> ``CenterCrop(size)``,
which the model card states exactly. The train-time and "test-time" sizes are not used.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import builders, hub
from export.errors import ExportError

log = logging.getLogger(__name__)

PREFIX = "timm/"
RESNET_MODULES = frozenset({"timm.models.resnet", "timm.models.resnetv2"})
"""Where timm defines its ResNet families (resnet, -d, se, resnext, wide, eca, rs; v2)."""
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_PROBE_TIMEOUT_S = 10


def library() -> str:
    import timm

    return f"timm {timm.__version__}"


def build(
    name: str,
    *,
    weights: str | None,
    num_classes: int | None,
    state: Mapping[str, torch.Tensor] | None,
) -> builders.Source:
    """``timm/<name>``: random weights, a checkpoint's (``state``) or a pretrained tag's."""
    import timm

    base, dot, tag = name.partition(".")
    if dot and timm.is_model(base):
        raise ExportError(
            f"{PREFIX}{name}: give the pretrained tag with --weights: "
            f"{PREFIX}{base} --weights {tag}"
        )
    check_name(name)
    if weights is not None:
        model = _pretrained(name, weights, num_classes=num_classes)
    else:
        classes = num_classes or _classes_in(name, state) or 1000
        model = timm.create_model(name, pretrained=False, num_classes=classes)
    return _source(model, name, weights=weights)


def from_folder(
    folder: Path,
    config: Mapping[str, Any],
    *,
    config_sha256: str,
    weights: Path | None,
    num_classes: int | None = None,
) -> builders.Source:
    """A timm Hub folder: ``config.json`` builds the model, the weights file fills it.

    ``weights=None`` builds the architecture alone, with a ``num_classes``-way head when
    given (a fine-tuned checkpoint's weights go in later; the folder's labels do not apply).
    """
    import timm

    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise ExportError(f"{folder}/config.json: 'architecture' must be a timm model name")
    check_name(arch, context=f" (the architecture in {folder}/config.json)")
    # timm's own reading of the folder: create_model(architecture, pretrained=False,
    # num_classes=..., pretrained_cfg=..., **model_args) from config.json, no weights.
    # An explicit num_classes takes precedence over the config's.
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=False, **kwargs)
    except Exception as exc:  # whatever timm raises on a config it cannot build
        raise hub.cannot_build(library(), arch, folder, exc) from exc
    if weights is None:
        source = _source(model, arch, weights=None, labelled=False)
        return replace(source, config_sha256=config_sha256)
    ckpt = hub.load_weights(model, weights, what=f"{arch} ({folder}/config.json)")
    source = _source(model, arch, weights=weights.name)
    return replace(source, config_sha256=config_sha256, weights_sha256=ckpt.sha256)


def check_name(name: str, *, context: str = "") -> None:
    """Fail on a name this timm does not know, suggesting close ones."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ExportError(
            f"unknown timm model {name!r}{context} in {library()}{hint} "
            "(timm.list_models() lists them all)"
        )


def data_defaults(cfg: Mapping[str, Any]) -> builders.Defaults:
    """timm's resolved eval data config (``resolve_model_data_config``) as the card's
    preprocessing; no labels yet.

    ``resize = floor(size / crop_pct)`` exactly as timm's eval transform computes it. What
    the card cannot state (a non-square input, a crop mode other than 'center', another
    filter) is kept as ``unsupported``: the export then needs --input-size and --resize.
    """
    import timm.data

    channels, height, width = (int(x) for x in cfg["input_size"])
    if channels != 3 or len(cfg["mean"]) != 3:
        raise ExportError(f"the model takes {channels} input channels; the service feeds 3 (RGB)")
    crop_pct = float(cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT)
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation", "bilinear")
    problems = []
    if height != width:
        problems.append(f"its input size is {height}x{width}, not square")
    if crop_mode != "center":
        problems.append(f"its crop mode is {crop_mode!r} (the card describes 'center' only)")
    if interpolation not in INTERPOLATIONS:
        problems.append(f"its interpolation is {interpolation!r}")
        interpolation = "bicubic"
    return builders.Defaults(
        labels=None,
        resize=math.floor(height / crop_pct),  # timm's transforms_imagenet_eval, to the pixel
        crop=height,
        mean=builders.triple(cfg["mean"]),
        std=builders.triple(cfg["std"]),
        interpolation=interpolation,
        crop_pct=crop_pct,
        unsupported="timm's eval transform cannot be served as is: " + "; ".join(problems)
        if problems
        else None,
    )


def _source(
    model: nn.Module, arch: str, *, weights: str | None, labelled: bool = True
) -> builders.Source:
    """The Source of a built timm model: its data config, labels (unless ``labelled`` is
    False: a new head's classes are not the config's), and a word if it is not a ResNet."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    labels = _labels(model) if labelled else None
    defaults = replace(data_defaults(config), labels=labels, weights=weights)
    module = type(model).__module__
    if module not in RESNET_MODULES:
        log.warning(
            "%s (%s.%s) is not a ResNet: exported through timm's forward_features/forward_head "
            "contract and verified as usual, but only timm's ResNet families are tested here",
            arch, module, type(model).__name__,
        )  # fmt: skip
    return builders.Source(model.eval(), "timm", arch, defaults, library=library())


def _labels(model: nn.Module) -> tuple[str, ...] | None:
    """The config's label names (with their descriptions where given), else ImageNet-1k's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classes = int(getattr(model, "num_classes", 0))
    names = cfg.get("label_names")
    if names:
        if isinstance(names, Mapping):  # {index: name}, timm's form when indices have gaps
            by_index = {int(k): str(v) for k, v in names.items()}
            if sorted(by_index) != list(range(classes)):
                raise ExportError(
                    f"label_names covers indices {min(by_index)}..{max(by_index)} "
                    f"({len(by_index)} names) but the model has {classes} classes: give --labels"
                )
            names = [by_index[i] for i in range(classes)]
        descriptions = cfg.get("label_descriptions") or {}
        return tuple(str(descriptions.get(n, n)) for n in names)
    if classes == 1000:
        from timm.data import ImageNetInfo

        return tuple(ImageNetInfo().label_descriptions())
    return None


def _classes_in(name: str, state: Mapping[str, torch.Tensor] | None) -> int | None:
    """The width of the checkpoint's classifier, so that the head is built to fit it."""
    import timm.models

    if state is None:
        return None
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "fc"
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def _pretrained(name: str, tag: str, *, num_classes: int | None) -> nn.Module:
    import timm
    import timm.models

    tagged = f"{name}.{tag.removeprefix(name + '.')}"
    known = timm.list_pretrained(f"{name}.*")
    if tagged not in known:
        tags = ", ".join(k.partition(".")[2] for k in known) or "none"
        raise ExportError(f"timm has no {name} weights {tag!r}; known tags: {tags}")
    cfg = timm.models.get_pretrained_cfg(tagged)
    if cfg is None:
        raise ExportError(f"timm has no pretrained config for {tagged}")
    if num_classes not in (None, cfg.num_classes):
        raise ExportError(f"--weights {tag} has {cfg.num_classes} classes, not {num_classes}")
    where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else str(cfg.url)
    if not _cached(cfg):
        _check_reachable(where, tagged)
    log.info("fetching timm weights %s (cached under $HF_HOME or $TORCH_HOME)", tagged)
    try:
        return timm.create_model(tagged, pretrained=True)
    except (OSError, ConnectionError, urllib.error.URLError) as exc:
        raise _offline(tagged, where, exc) from exc


def _cached(cfg: Any) -> bool:
    """Whether timm would find the weights without the network."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(cfg.url))
    return cached.is_file()


def _check_reachable(url: str, tagged: str) -> None:
    """One quick request first: the Hub client retries for about a minute before failing."""
    try:
        urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=_PROBE_TIMEOUT_S
        ).close()
    except urllib.error.HTTPError:
        return  # the server answered: reachable (the download reports its own errors)
    except (urllib.error.URLError, OSError) as exc:
        raise _offline(tagged, url, exc) from exc


def _offline(tagged: str, where: str, exc: BaseException) -> ExportError:
    reason = getattr(exc, "reason", None) or exc
    return ExportError(
        f"cannot download timm weights {tagged} from {where} ({reason}); this machine looks "
        f"offline: fetch them elsewhere (hf download timm/{tagged} --local-dir DIR) and "
        "export that folder, or pass the weights file with --checkpoint, or use --weights none"
    )
