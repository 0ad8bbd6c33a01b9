"""Hostile and unusual inputs for /predict, each with the status it must get.

Images are drawn with Pillow (real encoders: libjpeg, libpng, libwebp, libtiff) from one
photo-like picture; the crafted files (headers that lie, bombs) are built byte by byte.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

MAX_BODY = 20 * 1024 * 1024
"""The service's default max_body_bytes."""


@dataclass(frozen=True)
class Case:
    """One request to /predict (``path`` may add a query) and what it must answer."""

    name: str
    status: int
    code: str | None = None  # the error code, for 4xx answers
    body: bytes | None = None
    content_type: str | None = "application/octet-stream"
    path: str = "/predict"
    files: list[tuple[str, tuple[str, bytes]]] | None = None
    data: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    method: str = "POST"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (8-bit gray), with ``idat`` as data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header)
    if idat:
        chunks += png_chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IEND", b"")


def zero_png_bomb(side: int) -> bytes:
    """A real gray PNG of side x side zeros: a few hundred kB that decode to side**2 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_claiming(side, side, data)


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF0 frame header rewritten to claim another size."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(image, "JPEG", exif=exif.tobytes())


def animated_gif(image: Image.Image) -> bytes:
    frames = [image.convert("P"), image.rotate(90).convert("P"), image.rotate(180).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def palette_with_transparency(image: Image.Image) -> bytes:
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(palette, "PNG", transparency=0)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostile") -> bytes:
    """A multipart/form-data body by hand: (field, filename or None for text, content)."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content
        out += b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def picture(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB picture with gradients and noise, so that every encoder has real work."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(5).normal(0, 12, (height, width, 3))
    base = np.stack([255 * x / width, 255 * y / height, 128 + 90 * np.sin(x / 5)], -1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def corpus(photo: Image.Image | None = None) -> list[Case]:
    """Every case, made from ``photo`` (default :func:`picture`)."""
    photo = photo or picture()
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    rng = np.random.default_rng(7)
    wide16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)  # I;16
    gray = photo.convert("L")
    raw_parts = "multipart/form-data; boundary=hostile"
    ok = 200
    cases = [
        # Valid but odd: classified, not rejected.
        Case("1x1 PNG", ok, body=encode(photo.resize((1, 1)), "PNG")),
        Case("16-bit grayscale PNG", ok, body=encode(wide16, "PNG")),
        Case("CMYK JPEG", ok, body=encode(photo.convert("CMYK"), "JPEG")),
        Case("palette PNG with transparency", ok, body=palette_with_transparency(photo)),
        Case("RGBA PNG", ok, body=encode(photo.convert("RGBA"), "PNG")),
        Case("LA PNG", ok, body=encode(photo.convert("LA"), "PNG")),
        Case("1-bit PNG", ok, body=encode(photo.convert("1"), "PNG")),
        Case("animated GIF", ok, body=animated_gif(photo)),
        Case("EXIF-rotated JPEG", ok, body=exif_rotated(photo)),
        Case("progressive JPEG", ok, body=encode(photo, "JPEG", progressive=True)),
        Case("grayscale JPEG", ok, body=encode(gray, "JPEG")),
        Case("WebP", ok, body=encode(photo, "WEBP"), content_type="image/webp"),
        Case(
            "lossless WebP with alpha",
            ok,
            body=encode(photo.convert("RGBA"), "WEBP", lossless=True),
        ),
        Case("BMP", ok, body=encode(photo, "BMP"), content_type="image/bmp"),
        Case("TIFF", ok, body=encode(photo, "TIFF"), content_type="image/tiff"),
        Case("32-bit float TIFF", ok, body=encode(gray.convert("F"), "TIFF")),
        Case("1x3000 PNG (extreme aspect)", ok, body=encode(photo.resize((1, 3000)), "PNG")),
        Case("PNG sent as image/jpeg", ok, body=png, content_type="image/jpeg"),
        Case("no Content-Type header", ok, body=jpeg, content_type=None),
        Case("chunked body (no Content-Length)", ok, body=jpeg, chunked=True),
        Case("multipart, field 'images'", ok, files=[("images", ("a.jpg", jpeg))]),
        # Broken or not images.
        Case("zero bytes", 422, "missing_image", body=b""),
        Case("truncated JPEG", 422, "invalid_image", body=jpeg[: len(jpeg) // 2]),
        Case("JPEG cut after 20 bytes", 422, "invalid_image", body=jpeg[:20]),
        Case("truncated PNG", 422, "invalid_image", body=png[: len(png) // 2]),
        Case(
            "PNG with a bad header CRC",
            422,
            "invalid_image",
            body=png[:29] + b"\0\0\0\0" + png[33:],
        ),
        Case("truncated GIF", 422, "invalid_image", body=animated_gif(photo)[:60]),
        Case(
            "random bytes as image/jpeg",
            415,
            "unsupported_image",
            body=rng.bytes(3000),
            content_type="image/jpeg",
        ),
        Case("text file", 415, "unsupported_image", body=b"just some text\n" * 20),
        Case(
            "text/plain Content-Type",
            415,
            "unsupported_media_type",
            body=b"text",
            content_type="text/plain",
        ),
        Case(
            "wrong Content-Type (JSON)",
            415,
            "unsupported_media_type",
            body=jpeg,
            content_type="application/json",
        ),
        Case(
            "SVG",
            415,
            "unsupported_image",
            body=b'<svg xmlns="http://www.w3.org/2000/svg"/>',
            content_type="image/svg+xml",
        ),
        Case(
            "EPS (never run through Ghostscript)",
            415,
            "unsupported_image",
            body=b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        ),
        Case("PPM (format not served)", 415, "unsupported_image", body=encode(photo, "PPM")),
        # Too large.
        Case(
            "PNG header claiming 30000x30000",
            413,
            "payload_too_large",
            body=png_claiming(30000, 30000),
        ),
        Case(
            "PNG header claiming 7000x7000", 413, "payload_too_large", body=png_claiming(7000, 7000)
        ),
        Case(
            "JPEG header claiming 65000x65000",
            413,
            "payload_too_large",
            body=jpeg_claiming(jpeg, 65000, 65000),
        ),
        Case("zero-filled PNG bomb, 8000x8000", 413, "payload_too_large", body=zero_png_bomb(8000)),
        Case("body over 20 MiB", 413, "payload_too_large", body=b"\0" * (MAX_BODY + 1)),
        Case(
            "chunked body over 20 MiB",
            413,
            "payload_too_large",
            body=b"\0" * (MAX_BODY + 1),
            chunked=True,
        ),
        Case(
            "chunked multipart over 20 MiB",
            413,
            "payload_too_large",
            body=multipart([("file", "big.jpg", b"\0" * (MAX_BODY + 1))]),
            content_type=raw_parts,
            chunked=True,
        ),
        Case(
            "65 files (limit 64)",
            413,
            "payload_too_large",
            files=[("file", (f"{i}.jpg", jpeg)) for i in range(65)],
        ),
        # Multipart mistakes.
        Case(
            "multipart without a file (text field)",
            400,
            "bad_request",
            data={"file": "not a file"},
            files=[("other", ("a", b""))],
        ),
        Case(
            "multipart with no parts",
            422,
            "missing_image",
            body=b"--hostile--\r\n",
            content_type=raw_parts,
        ),
        Case("multipart, wrong field name", 400, "bad_request", files=[("photo", ("a.jpg", jpeg))]),
        Case(
            "multipart without a boundary",
            400,
            "bad_request",
            body=b"--x\r\n\r\n",
            content_type="multipart/form-data",
        ),
        Case(
            "multipart, one good and one truncated file",
            422,
            "invalid_image",
            files=[("file", ("ok.jpg", jpeg)), ("file", ("cut.jpg", jpeg[:100]))],
        ),
        # Parameters.
        Case("top_k not a number", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=many"),
        Case("top_k negative", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=-1"),
        Case("top_k zero", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=0"),
        Case(
            "top_k over the classes", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=11"
        ),
        Case("top_k huge", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=" + "9" * 40),
        Case("top_k fractional", 422, "invalid_parameter", body=jpeg, path="/predict?top_k=2.5"),
        Case("unknown model", 404, "model_not_found", body=jpeg, path="/predict?model=nope"),
        Case(
            "model name with a path",
            404,
            "model_not_found",
            body=jpeg,
            path="/predict?model=../../etc/passwd",
        ),
        Case("unknown version", 404, "model_not_found", body=jpeg, path="/predict?version=7"),
        Case(
            "version not a number",
            422,
            "invalid_parameter",
            body=jpeg,
            path="/predict?version=latest",
        ),
        Case(
            "X-Request-Timeout not a number",
            422,
            "invalid_parameter",
            body=jpeg,
            headers={"X-Request-Timeout": "soon"},
        ),
        Case(
            "X-Request-Timeout already over",
            504,
            "deadline_exceeded",
            body=jpeg,
            headers={"X-Request-Timeout": "1e-9"},
        ),
        Case("GET instead of POST", 405, "method_not_allowed", method="GET"),
    ]
    return cases
