"""The card's preprocessing as the service runs it (``service.preprocess.Preprocessor``, JPEG
draft decoding on) against the source library's own eval transform, on the 100 shared photos
(500x375 mostly; portrait, square, 168 to 900 pixels).

timm: ``create_transform(**resolve_data_config, is_training=False)`` is Resize(floor(size /
crop_pct)) -> CenterCrop -> ToTensor -> Normalize on PIL, which the service computes bit for
bit. The one difference is the service's own: a JPEG at least twice the resize target is
decoded at a reduced scale (tests/service/test_preprocess.py bounds it); on these photos
that is the 900x900 one for the smaller models, at most 8 levels of 255 anywhere and under
0.6 on average, and nothing on every other photo.

transformers: ``ConvNextImageProcessor`` resizes the shorter side to int(shortest_edge /
crop_pct) like the card, but starts its center crop at (side - crop) // 2, where
torchvision, the card and the service take round((side - crop) / 2) (half to even). Where
those differ the served crop sits one pixel further right or down. The tests pin that
down exactly: aligned by that pixel, the PIL processor equals the service bit for bit, and
the default ("fast", torchvision tensor) processor within FAST_MAX_ABS of it (its resize is
not PIL's); unaligned, the photos whose crops start alike equal it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import timm.data
from hub_folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_shift,
    photos,
    rgb,
    transformers_pixels,
)
from PIL import Image
from transformers import AutoImageProcessor, ResNetConfig

from export import hf_source, timm_source
from export.builders import Defaults
from service.metadata import Preprocessing
from service.preprocess import Preprocessor

DRAFT_MAX_LEVELS = 8.0
DRAFT_MEAN_LEVELS = 0.6
# The default processor's resize (torchvision on tensors) against PIL's, in normalized
# units: about 3 levels of 255 at most (measured 0.035), per photo 3e-4 on average (1.3e-4).
FAST_MAX_ABS = 0.05
FAST_MEAN_ABS = 3e-4


def card_preprocessing(d: Defaults) -> Preprocessing:
    return Preprocessing(
        resize=d.resize, crop=d.crop, mean=d.mean, std=d.std, interpolation=d.interpolation
    )


def served(pre: Preprocessing) -> tuple[list[np.ndarray], list[bool]]:
    """The service's tensors for every photo, and whether each was draft-decoded."""
    prep = Preprocessor(pre, max_pixels=10**8, draft=True)
    tensors, drafted = [], []
    for path in photos():
        image = prep.decode(path.read_bytes())
        with Image.open(path) as full:
            drafted.append(image.size != full.size)
        tensors.append(prep.transform(image))
    return tensors, drafted


@pytest.mark.parametrize(
    ("tag", "resize", "crop", "drafted"),
    [
        ("resnet50d.a1_in1k", 235, 224, 0),  # bicubic, crop_pct 0.95
        ("resnet50.tv_in1k", 256, 224, 0),  # bilinear, 0.875
        ("resnetrs50.tf_in1k", 175, 160, 1),  # bicubic, 0.91: floor(175.8)
        ("resnetv2_50x1_bit.goog_in21k_ft_in1k", 448, 448, 0),  # crop_pct 1.0, mean 0.5
    ],
)
def test_timm_eval_transform(tag: str, resize: int, crop: int, drafted: int) -> None:
    pretrained = timm.models.get_pretrained_cfg(tag)
    assert pretrained is not None
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict())
    pre = card_preprocessing(timm_source.data_defaults(config))
    assert (pre.resize, pre.crop) == (resize, crop)
    transform = timm.data.create_transform(**config, is_training=False)
    ours, was_drafted = served(pre)
    assert sum(was_drafted) == drafted
    levels = np.asarray(pre.std, dtype=np.float32)[:, None, None] * 255
    for path, got, draft in zip(photos(), ours, was_drafted, strict=True):
        want = transform(rgb(path)).numpy()
        if not draft:
            np.testing.assert_array_equal(got, want, err_msg=path.name)
        else:
            diff = np.abs(got - want) * levels
            assert diff.max() <= DRAFT_MAX_LEVELS and diff.mean() <= DRAFT_MEAN_LEVELS, path.name


# microsoft/resnet-50's preprocessor_config.json as the Hub serves it (the older feature
# extractor format: a bare size), and a newer one saved by ConvNextImageProcessor.
MICROSOFT_RESNET = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "resample": 3,
    "size": 224,
}
BILINEAR_095 = {
    "crop_pct": 0.95,
    "image_processor_type": "ConvNextImageProcessor",
    "resample": 2,
    "size": {"shortest_edge": 224},
}


@pytest.mark.parametrize(
    ("processor", "resize", "shifted"),
    [(MICROSOFT_RESNET, 256, 12), (BILINEAR_095, 235, 100)],
    ids=["microsoft-resnet", "bilinear-0.95"],
)
@pytest.mark.parametrize("backend", ["default", "pil"])
def test_transformers_image_processor(
    processor: dict[str, Any], resize: int, shifted: int, backend: str, tmp_path: Path
) -> None:
    ResNetConfig().save_pretrained(tmp_path)  # AutoImageProcessor looks at the model type
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    pre = card_preprocessing(hf_source.processor_defaults(tmp_path))
    assert (pre.resize, pre.crop) == (resize, 224)
    if backend == "pil":
        library = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
        assert type(library).__name__ == "ConvNextImageProcessorPil"
        max_abs, mean_abs = 0.0, 0.0
    else:  # what a user gets by default: transformers 5's torchvision-based processor
        library = AutoImageProcessor.from_pretrained(tmp_path)
        assert type(library).__name__ == "ConvNextImageProcessor"
        max_abs, mean_abs = FAST_MAX_ABS, FAST_MEAN_ABS
    want = transformers_pixels(library, photos())
    ours, _ = served(pre)
    shifts = [crop_shift(p, pre) for p in photos()]
    assert sum(s != (0, 0) for s in shifts) == shifted
    c = pre.crop
    for got, ref, (dx, dy) in zip(ours, want, shifts, strict=True):
        assert dx in (0, 1) and dy in (0, 1)
        diff = np.abs(got[:, : c - dy, : c - dx] - ref[:, dy:, dx:])  # aligned by the shift
        assert diff.max() <= max_abs and diff.mean() <= mean_abs
