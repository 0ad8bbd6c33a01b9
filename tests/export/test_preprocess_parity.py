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
crop_pct) like the card and starts its center crop at (side - crop) // 2, both backends,
which the card states as ``crop_rounding`` 'floor' (torchvision rounds half to even: on
these photos the two differ for 12 crops at 256/224 and all 100 at 235/224). The PIL
processor equals the service bit for bit on every photo, as does the export's own
verification input (``export.verify.folder_images``); the default ("fast", torchvision
tensor) processor is within FAST_MAX_ABS of it, its resize not being PIL's.
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
    PHOTOS,
    photos,
    rgb,
    transformers_pixels,
)
from PIL import Image
from transformers import AutoImageProcessor, ResNetConfig

from export import hf_source, timm_source
from export.builders import Defaults
from export.verify import folder_images
from service.metadata import Preprocessing
from service.preprocess import Preprocessor, crop_box, resized_size

DRAFT_MAX_LEVELS = 8.0
DRAFT_MEAN_LEVELS = 0.6
# The default processor's resize (torchvision on tensors) against PIL's, in normalized
# units: about 3 levels of 255 at most (measured 0.035), per photo 3e-4 on average (1.3e-4).
FAST_MAX_ABS = 0.05
FAST_MEAN_ABS = 3e-4


def card_preprocessing(d: Defaults) -> Preprocessing:
    return Preprocessing(
        resize=d.resize,
        crop=d.crop,
        mean=d.mean,
        std=d.std,
        interpolation=d.interpolation,
        crop_rounding=d.crop_rounding,
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


def odd_margins(pre: Preprocessing) -> int:
    """Photos whose crop starts elsewhere when rounded half to even instead of floored."""
    count = 0
    for path in photos():
        with Image.open(path) as image:
            size = resized_size(image.width, image.height, pre.resize)
        count += crop_box(*size, pre.crop, rounding="floor") != crop_box(*size, pre.crop)
    return count


@pytest.mark.parametrize(
    ("processor", "resize", "odd"),
    [(MICROSOFT_RESNET, 256, 12), (BILINEAR_095, 235, 100)],
    ids=["microsoft-resnet", "bilinear-0.95"],
)
@pytest.mark.parametrize("backend", ["default", "pil"])
def test_transformers_image_processor(
    processor: dict[str, Any], resize: int, odd: int, backend: str, tmp_path: Path
) -> None:
    ResNetConfig().save_pretrained(tmp_path)  # AutoImageProcessor looks at the model type
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    pre = card_preprocessing(hf_source.processor_defaults(tmp_path))
    assert (pre.resize, pre.crop, pre.crop_rounding) == (resize, 224, "floor")
    assert odd_margins(pre) == odd  # the photos where the rounding matters
    ours, drafted = served(pre)
    assert not any(drafted)
    if backend == "pil":
        library = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
        assert type(library).__name__ == "ConvNextImageProcessorPil"
        want = transformers_pixels(library, photos())
        np.testing.assert_array_equal(np.stack(ours), want)
        # The export verifies on the same tensors as the library computes.
        np.testing.assert_array_equal(folder_images(PHOTOS, len(want), pre).numpy(), want)
    else:  # what a user gets by default: transformers 5's torchvision-based processor
        library = AutoImageProcessor.from_pretrained(tmp_path)
        assert type(library).__name__ == "ConvNextImageProcessor"
        want = transformers_pixels(library, photos())
        for path, got, ref in zip(photos(), ours, want, strict=True):
            diff = np.abs(got - ref)
            assert diff.max() <= FAST_MAX_ABS and diff.mean() <= FAST_MEAN_ABS, path.name
