"""Preprocessing equals torchvision's eval transforms on real images, for every Pillow mode."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidImage, MissingImage, PayloadTooLarge, UnsupportedImage
from service.metadata import CropRounding, Preprocessing
from service.preprocess import BACKGROUND, Preprocessor, crop_box, resized_size

Reference = Callable[[bytes, Preprocessing], np.ndarray]
"""The ``torchvision_eval`` fixture (tests/conftest.py): PIL + torchvision eval transform."""

IMAGENET = Preprocessing(
    resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
CIFAR = Preprocessing(resize=32, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
# A crop larger than the resize: torchvision pads with zeros before cropping.
PADDED = Preprocessing(resize=20, crop=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("spec", [IMAGENET, CIFAR, PADDED], ids=["imagenet", "cifar", "padded"])
def test_equals_torchvision_bit_for_bit_without_draft(
    spec: Preprocessing, test_images: dict[str, bytes], torchvision_eval: Reference
) -> None:
    pre = Preprocessor(spec, max_pixels=10**8, draft=False)
    for name, data in test_images.items():
        got = pre(data)
        assert got.shape == (3, spec.crop, spec.crop) and got.dtype == np.float32, name
        np.testing.assert_array_equal(got, torchvision_eval(data, spec), err_msg=name)


@pytest.mark.parametrize("interpolation", ["bicubic", "nearest"])
def test_equals_torchvision_with_other_interpolations(
    interpolation: str, test_images: dict[str, bytes], torchvision_eval: Reference
) -> None:
    spec = IMAGENET.model_copy(update={"interpolation": interpolation})
    data = test_images["photo_500x375.jpg"]
    got = Preprocessor(spec, max_pixels=10**8, draft=False)(data)
    np.testing.assert_array_equal(got, torchvision_eval(data, spec))


def test_bgr_channel_order_reverses_the_channels(test_images: dict[str, bytes]) -> None:
    data = test_images["portrait_90x120.png"]
    spec = CIFAR.model_copy(update={"channel_order": "BGR", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    rgb = CIFAR.model_copy(update={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    got = Preprocessor(spec, max_pixels=10**8)(data)
    np.testing.assert_array_equal(got, Preprocessor(rgb, max_pixels=10**8)(data)[::-1])


def test_geometry_follows_torchvision() -> None:
    assert resized_size(500, 375, 256) == (341, 256)  # long side truncated, as torchvision
    assert resized_size(375, 500, 256) == (256, 341)
    assert crop_box(341, 256, 224) == (58, 16, 282, 240)
    assert crop_box(20, 20, 24) == (-2, -2, 22, 22)
    # Padding (crop larger than the image) is the same for both roundings: (crop - side)
    # // 2 before, as torchvision and transformers' default processor pad.
    assert crop_box(29, 31, 32, rounding="floor") == crop_box(29, 31, 32) == (-1, 0, 31, 32)


@pytest.mark.parametrize(
    ("height", "rounding", "left", "top"),
    [
        (35, "half_even", 2, 2),  # margins 3 and 3: round(1.5) = 2
        (35, "floor", 1, 1),  # 3 // 2 = 1
        (175, "half_even", 2, 72),  # past BOX_ASPECT: margin 143, round(71.5) = 72
        (175, "floor", 1, 71),
    ],
)
def test_crop_rounding_on_odd_margins(
    height: int, rounding: CropRounding, left: int, top: int
) -> None:
    """A 35-pixel-wide image cropped to 32 (no resize): where the crop starts, by its pixels.

    Red holds each pixel's column, green its row, so the crop's first pixel names its offset.
    """
    columns, rows = np.meshgrid(np.arange(35), np.arange(height))
    pixels = np.stack([columns, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    spec = Preprocessing(
        resize=35, crop=32, mean=(0.0,) * 3, std=(1.0,) * 3, crop_rounding=rounding
    )
    assert crop_box(35, height, 32, rounding=spec.crop_rounding) == (
        left, top, left + 32, top + 32
    )  # fmt: skip
    got = Preprocessor(spec, max_pixels=10**6).transform(Image.fromarray(pixels))
    level = np.float32(255)  # mean 0, std 1: a pixel's value v becomes v / 255
    np.testing.assert_array_equal(got[0, 0, :3], np.float32([left, left + 1, left + 2]) / level)
    np.testing.assert_array_equal(got[1, :3, 0], np.float32([top, top + 1, top + 2]) / level)
    np.testing.assert_array_equal(got[:2, 31, 31], np.float32([left + 31, top + 31]) / level)


def test_large_jpeg_draft_stays_within_tolerance_of_full_decode(
    photo_like: Callable[[int, int, int], Image.Image], torchvision_eval: Reference
) -> None:
    """12 MP JPEG for a 224-pixel model: DCT-scaled to 1/4 instead of a full decode."""
    data = encode(photo_like(4000, 3000, 7), "JPEG", quality=90)
    full = Preprocessor(IMAGENET, max_pixels=10**8, draft=False)
    drafted = Preprocessor(IMAGENET, max_pixels=10**8, draft=True)
    assert drafted.decode(data).size == (1000, 750)
    assert full.decode(data).size == (4000, 3000)
    expected = torchvision_eval(data, IMAGENET)
    np.testing.assert_array_equal(full(data), expected)
    diff = np.abs(drafted(data) - expected)
    # In 0..255 pixel units (x std x 255): at most ~4 levels anywhere, ~0.3 on average.
    pixel_diff = diff * np.asarray(IMAGENET.std, dtype=np.float32)[:, None, None] * 255
    assert pixel_diff.max() < 6.0, pixel_diff.max()
    assert pixel_diff.mean() < 0.6, pixel_diff.mean()


def test_small_jpeg_is_not_drafted(
    test_images: dict[str, bytes], torchvision_eval: Reference
) -> None:
    data = test_images["photo_500x375.jpg"]  # shorter side 375 < 2 x 256
    got = Preprocessor(IMAGENET, max_pixels=10**8, draft=True)(data)
    np.testing.assert_array_equal(got, torchvision_eval(data, IMAGENET))


def decode(image: Image.Image, fmt: str = "PNG", **params: object) -> Image.Image:
    return Preprocessor(CIFAR, max_pixels=10**8).decode(encode(image, fmt, **params))


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode(image, "JPEG", exif=exif.tobytes(), quality=100)
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 50  # the blue half is on top after rotation
    assert bottom[0] > 200 and bottom[2] < 50


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    decoded = decode(rgba)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == BACKGROUND
    assert decoded.getpixel((0, 0)) == (0, 0, 255)
    assert decoded.getpixel((1, 0)) == (127, 127, 127)
    assert decode(rgba.convert("LA")).getpixel((5, 5)) == BACKGROUND


def test_palette_with_transparent_index_is_composited() -> None:
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # 0: black, 1: green
    palette.putpixel((3, 3), 1)
    decoded = decode(palette, "PNG", transparency=0)
    assert decoded.getpixel((0, 0)) == BACKGROUND  # transparent black -> white
    assert decoded.getpixel((3, 3)) == (0, 255, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode(image)
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100,) * 3, (255,) * 3]


def test_cmyk_jpeg_converts_to_rgb() -> None:
    decoded = decode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)
    red, green, blue = decoded.getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = Preprocessor(CIFAR, max_pixels=10**8).decode(buffer.getvalue())
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


def test_one_bit_and_float_images_convert() -> None:
    assert decode(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert decode(floats, "TIFF").getpixel((0, 0)) == (128, 128, 128)


def test_bad_inputs_raise_the_right_errors(test_images: dict[str, bytes]) -> None:
    pre = Preprocessor(CIFAR, max_pixels=1000)
    with pytest.raises(MissingImage):
        pre(b"")
    with pytest.raises(UnsupportedImage):
        pre(b"this is not an image at all")
    with pytest.raises(InvalidImage, match="JPEG data is corrupt or truncated"):
        data = test_images["photo_500x375.jpg"]
        Preprocessor(CIFAR, max_pixels=10**8, draft=False)(data[: len(data) // 2])
    with pytest.raises(PayloadTooLarge, match="500x375 = 187500 pixels; at most 1000"):
        pre(test_images["photo_500x375.jpg"])
