"""The in-process ceiling: the service's decoding, preprocessing and engine, without HTTP.

What ``python -m tools.bench`` holds the server's throughput against: the same images,
the same thread counts and batch sizes, in this process.
"""

from __future__ import annotations

import io
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

from service.engine import Engine, ThreadSettings, warmup_sizes
from service.preprocess import Preprocessor
from service.settings import Settings
from tools.loadgen import percentiles_ms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_RUNS = 4
"""Engine runs timed at least, per batch size, however long they take."""


def load_images(path: Path, count: int) -> list[bytes]:
    """Up to ``count`` image files from a folder (recursively) or a tar archive."""
    images: list[bytes] = []
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and len(images) < count:
                images.append(file.read_bytes())
    else:
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member) if member.isfile() else None
                if data is not None and member.name.lower().endswith(IMAGE_SUFFIXES):
                    images.append(data.read())
                    if len(images) == count:
                        break
    if not images:
        raise SystemExit(f"no images found in {path}")
    return images


class InProcess:
    """The service's decoding, preprocessing and engine, in this process, on its threads."""

    def __init__(
        self, model: Path, images: list[bytes], settings: Settings, *, instances: int = 1
    ) -> None:
        self.instances = instances
        threads = ThreadSettings(  # the threads the server gives each of the model's instances
            settings.intra_op_threads_for(instances),
            settings.inter_op_threads,
            settings.allow_spinning,
        )
        self.engine = Engine(model, providers=settings.providers, threads=threads)
        self.pre = Preprocessor(
            self.engine.card.preprocessing,
            max_pixels=settings.max_image_pixels,
            draft=settings.jpeg_draft,
        )
        self.images = images
        self.sizes = warmup_sizes(settings.max_batch_size)  # the sizes the server warms up
        self.engine.warm_up(self.sizes)
        self.pool = ThreadPoolExecutor(settings.effective_preprocess_threads())

    def close(self) -> None:
        self.pool.shutdown()

    def rate(self, size: int, seconds: float) -> float:
        """Images/s at batch ``size``: decode in the pool, then one engine run per batch.

        With several instances, as many streams do this at once on the one session, as the
        server's engine threads do.
        """
        start = time.perf_counter()
        with ThreadPoolExecutor(self.instances) as streams:
            runs = [streams.submit(self._stream, size, seconds, i) for i in range(self.instances)]
            done = sum(run.result() for run in runs)
        return done / (time.perf_counter() - start)

    def _stream(self, size: int, seconds: float, offset: int) -> int:
        done, index, start = 0, offset * 7, time.perf_counter()
        # At least MIN_RUNS batches: a ResNet-50 batch of 32 takes over a second here.
        while done < MIN_RUNS * size or time.perf_counter() - start < seconds:
            chunk = [self.images[(index + i) % len(self.images)] for i in range(size)]
            index += size
            self.engine.run(np.stack(list(self.pool.map(self.pre, chunk))))
            done += size
        return done

    def lone_p50_ms(self, seconds: float, *, via_pool: bool) -> float:
        """Batch-1 p50 latency, one image at a time, decoded in the pool or in this thread."""
        latencies: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            image = self.images[len(latencies) % len(self.images)]
            began = time.perf_counter()
            row = self.pool.submit(self.pre, image).result() if via_pool else self.pre(image)
            self.engine.run(row[None])
            latencies.append(time.perf_counter() - began)
        return percentiles_ms(latencies)[0]


def large_jpeg_ms(pre: Preprocessor, repeats: int = 5) -> tuple[float, float]:
    """Median ms to preprocess a 12-megapixel JPEG (4000x3000), with and without draft mode."""
    size = (4000, 3000)
    gradient = Image.linear_gradient("L").resize(size)
    photo = Image.merge("RGB", (gradient, gradient.rotate(90).resize(size), gradient.rotate(45)))
    # Mild sensor noise: a camera JPEG of this size is a few MB, not the 10 MB of pure noise.
    photo = ImageChops.add(photo, Image.effect_noise(size, 4).convert("RGB"), offset=-128)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    timings = []
    for draft in (True, False):
        probe = Preprocessor(pre.spec, max_pixels=pre.max_pixels, draft=draft)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            probe(data)
            runs.append(time.perf_counter() - start)
        timings.append(1000.0 * float(np.median(runs)))
    return timings[0], timings[1]
