"""Image bytes -> the float32 tensor a model expects, as its model card describes.

The transform is torchvision's eval transform on a PIL image, reproduced exactly:
``Resize(resize)`` (shorter side, PIL resampling, which always antialiases) ->
``CenterCrop(crop)`` (zero padding when the crop is larger) -> ``ToTensor()`` ->
``Normalize(mean, std)``. The last two steps go through a per-channel lookup table built
with the same float32 arithmetic as torchvision, so the output is bit-for-bit the same.
A card whose ``crop_rounding`` is 'floor' starts the crop where transformers' image
processors do instead: on an odd margin, half a pixel to the left or up rather than to
the even side.

Decoding turns any Pillow image into RGB:

* the EXIF orientation is applied; animated images (GIF, APNG, WebP) use their first frame;
* images with transparency (RGBA, LA, PA, P or L or RGB with a transparent colour) are
  composited onto a **white** background, as a viewer shows them on a page; the hidden
  colour under a transparent pixel is arbitrary and would otherwise leak into the input;
* 16- and 32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 to 0..255
  (Pillow's own conversion clips at 255 instead, turning most 16-bit images white);
  float images (``F``) are read as 0..1 when their maximum is at most 1, else as 0..255;
* CMYK, YCbCr, palette and 1-bit images use Pillow's conversions.

Only the formats named in :data:`FORMATS` are opened: Pillow knows dozens more (EPS runs
Ghostscript, PSD, FITS, ...), and each is more decoder code facing hostile bytes. An image
of extreme aspect ratio (say 1x30000) would be resized to an intermediate of billions of
pixels before the centre crop; past :data:`BOX_ASPECT` the crop's source region alone is
resized instead (Pillow's ``box``), the same sampling within rounding.

A large JPEG is decoded at a reduced scale (libjpeg's DCT scaling, Pillow's ``draft``)
while it stays at least twice the resize target, the same "reducing gap" that Pillow's
``thumbnail`` uses; the resize that follows still antialiases, and the result stays
within a small tolerance of the full decode (tests/service/test_preprocess.py).
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import (
    InvalidImage,
    MissingImage,
    PayloadTooLarge,
    ServiceError,
    UnsupportedImage,
)
from service.metadata import CropRounding, Preprocessing

log = logging.getLogger(__name__)

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
DRAFT_GAP = 2
"""A JPEG is DCT-scaled only while its shorter side stays >= DRAFT_GAP * resize."""
BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited onto."""
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The Pillow formats a request may send (JPEG includes MPO, which many cameras write)."""
BOX_ASPECT = 4
"""Past this aspect ratio only the centre crop's source region is resized."""


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(shorter)``: the long side is truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def crop_box(
    width: int, height: int, crop: int, *, rounding: CropRounding = "half_even"
) -> tuple[int, int, int, int]:
    """The centre crop's box, padding (outside the image) when too small.

    'half_even' is torchvision's ``CenterCrop(crop)``; 'floor' is transformers' crop.
    """
    left = _offset(width, crop, rounding)
    top = _offset(height, crop, rounding)
    return left, top, left + crop, top + crop


def _offset(size: int, crop: int, rounding: CropRounding) -> int:
    if crop > size:
        # torchvision and transformers' default processor both pad (crop - size) // 2
        # before, then crop at 0 (transformers' PIL processor pads one more before an odd margin).
        return -((crop - size) // 2)
    if rounding == "floor":
        return (size - crop) // 2
    return round((size - crop) / 2.0)  # Python's round is half to even, as torchvision's


def normalization_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """[3, 256] float32: ``Normalize(mean, std)(ToTensor()(v))`` for every uint8 value v.

    Same operations, in the same float32 precision, as torchvision, so equal bit for bit.
    """
    scaled = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((scaled[None, :] - m) / s)


class Preprocessor:
    """Decodes image bytes and applies one model's eval transform. Thread-safe."""

    def __init__(self, spec: Preprocessing, *, max_pixels: int, draft: bool = True) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self.draft = draft
        self._resample = _RESAMPLE[spec.interpolation]
        self._table = normalization_table(spec.mean, spec.std)
        # Which RGB channel feeds each output channel (mean/std are in output order).
        self._channels = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.spec.crop, self.spec.crop)

    def __call__(self, data: bytes) -> np.ndarray:
        """Image file bytes -> float32 [3, crop, crop]."""
        return self.transform(self.decode(data))

    def decode(self, data: bytes) -> Image.Image:
        """Image file bytes -> an RGB image, oriented, first frame, alpha composited."""
        if not data:
            raise MissingImage("the image is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError as exc:
            raise _unsupported(data) from exc
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"image too large: {exc}") from exc
        except Exception as exc:  # Pillow raises many types on hostile headers
            raise InvalidImage(f"the image header could not be read: {exc}") from exc
        width, height = image.size
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"the image is {width}x{height} = {width * height} pixels; "
                f"at most {self.max_pixels} pixels are allowed"
            )
        try:
            if self.draft and image.format == "JPEG":
                target = DRAFT_GAP * self.spec.resize
                image.draft(None, (target, target))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
        except ServiceError:
            raise
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"image too large: {exc}") from exc
        except Exception as exc:  # truncated or corrupt data: Pillow's errors vary by codec
            log.debug("decode failed", exc_info=True)
            fmt = image.format or "image"
            raise InvalidImage(f"the {fmt} data is corrupt or truncated: {exc}") from exc

    def transform(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 [3, crop, crop], exactly as the card's eval transform."""
        spec = self.spec
        size = resized_size(image.width, image.height, spec.resize)
        if max(size) > BOX_ASPECT * spec.resize and spec.crop <= min(size):
            return self._table_lookup(self._resize_crop_region(image, size))
        if size != image.size:
            image = image.resize(size, self._resample)
        box = crop_box(size[0], size[1], spec.crop, rounding=spec.crop_rounding)
        if box != (0, 0, size[0], size[1]):
            image = image.crop(box)  # areas outside the image come back as zeros
        return self._table_lookup(image)

    def _resize_crop_region(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Resize-then-centre-crop computed on the crop's source region only."""
        spec = self.spec
        left, top, right, bottom = crop_box(
            size[0], size[1], spec.crop, rounding=spec.crop_rounding
        )
        sx, sy = image.width / size[0], image.height / size[1]
        region = (left * sx, top * sy, right * sx, bottom * sy)
        return image.resize((spec.crop, spec.crop), self._resample, box=region)

    def _table_lookup(self, image: Image.Image) -> np.ndarray:
        """ToTensor + Normalize of a crop-sized RGB image, through the lookup table."""
        pixels = np.asarray(image)
        out = np.empty(self.shape, dtype=np.float32)
        for index, channel in enumerate(self._channels):
            np.take(self._table[index], pixels[:, :, channel], out=out[index], mode="clip")
        return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (see the module docstring for the choices made)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _WIDE_INT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise InvalidImage(f"images in Pillow mode {mode!r} cannot be converted to RGB") from exc


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _unsupported(data: bytes) -> ServiceError:
    """415 for data of no format we serve; 422 for a file of ours too broken to identify."""
    fmt = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WebP"
    if fmt is not None:
        return InvalidImage(
            f"the data starts like a {fmt} file, but its header is corrupt or truncated"
        )
    return UnsupportedImage(
        "the data is not an image format the service can read; "
        "send JPEG, PNG, WebP, GIF, BMP or TIFF"
    )
