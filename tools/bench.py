"""``python -m tools.bench``: HTTP throughput and latency against the in-process ceiling.

In one run, on the same images and with the same settings (threads, batch size limit):

1. in-process ceiling: decode + preprocess (the service's thread pool size) + one ONNX
   Runtime run per batch, at each batch size; the best images/s, and the batch-1 latency;
2. a lone client (one request at a time): HTTP p50 latency against in-process batch 1,
   decoded in the pool as the ceiling does (and, for reference, all in one thread);
3. ``--repeat`` rounds of: the ceiling timed again at its best batch size, then
   ``--concurrency`` closed-loop clients for ``--duration`` seconds (images/s, p50/p95/p99
   latency, errors); the ratio of the two, and its median over the rounds. On a shared
   machine the throughput of both moves by 10-20 % from minute to minute: a ratio taken
   from back-to-back measurements, several times, is the figure to trust.

It starts its own server (``python -m service``, settings from the same RESNET_SERVE_*
environment) unless ``--url`` points at a running one.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops
from prometheus_client.parser import text_string_to_metric_families

from service.engine import Engine, ThreadSettings, warmup_sizes
from service.preprocess import Preprocessor
from service.repository import scan
from service.settings import Settings, load_settings
from tools.loadgen import LoadResult, build_requests, run_load

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-train.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_RUNS = 4
"""Engine runs timed at least, per batch size, however long they take."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, default=None, help="model repository [settings]")
    p.add_argument("--model", default=None, help="model name (default: the first)")
    p.add_argument("--url", default=None, help="benchmark this server instead of starting one")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder or .tar(.gz)")
    p.add_argument("--count", type=int, default=64, help="images to cycle through")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured under load")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load not measured")
    p.add_argument("--lone-seconds", type=float, default=3.0, help="seconds of lone requests")
    p.add_argument("--inprocess-seconds", type=float, default=1.5, help="seconds per batch size")
    p.add_argument("--client-processes", type=int, default=1, help="load generator processes")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (ceiling at the best batch size, HTTP load); the median ratio is"
        " reported (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


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


def percentiles_ms(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 95, 99])
    return float(p50), float(p95), float(p99)


class InProcess:
    """The service's decoding, preprocessing and engine, in this process, on its threads."""

    def __init__(self, model: Path, images: list[bytes], settings: Settings) -> None:
        threads = ThreadSettings(
            settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning
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
        """Images/s at batch ``size``: decode in the pool, then one engine run per batch."""
        done, index, start = 0, 0, time.perf_counter()
        # At least MIN_RUNS batches: a ResNet-50 batch of 32 takes over a second here.
        while done < MIN_RUNS * size or time.perf_counter() - start < seconds:
            chunk = [self.images[(index + i) % len(self.images)] for i in range(size)]
            index += size
            self.engine.run(np.stack(list(self.pool.map(self.pre, chunk))))
            done += size
        return done / (time.perf_counter() - start)

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "service", "--models", str(models), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not become ready within 10 minutes")


def batch_stats(url: str, model: str) -> tuple[float, float]:
    """(batches run, images in them) for ``model`` from the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "resnet_serve_batch_size":
            for sample in family.samples:
                if sample.labels.get("model") == model:
                    if sample.name.endswith("_count"):
                        count += sample.value
                    elif sample.name.endswith("_sum"):
                        total += sample.value
    return count, total


def report(name: str, result: LoadResult) -> str:
    p50, p95, p99 = percentiles_ms(result.latencies)
    rate = result.ok / result.seconds if result.seconds else 0.0
    return (
        f"{name}: {rate:8.1f} img/s  p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms  "
        f"ok {result.ok}  errors {result.errors}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(**({"models_dir": args.models} if args.models else {}))
    entries = scan(settings.models_dir)
    name = args.model or next(iter(entries), None)
    if name is None or name not in entries:
        raise SystemExit(
            f"model {name or '(any)'} not found under {settings.models_dir}; export one, e.g. "
            f"python -m export resnet50 --weights none --out {settings.models_dir} --name resnet50"
        )
    model_path = entries[name].versions[entries[name].latest]
    images = load_images(args.images, args.count)
    print(f"model {name} ({model_path}), {len(images)} images from {args.images}")
    print(
        f"threads: intra-op {settings.intra_op_threads or 'auto'}, preprocess "
        f"{settings.effective_preprocess_threads()}, cores {os.cpu_count()}"
    )

    bench = InProcess(model_path, images, settings)
    try:
        rates = {size: bench.rate(size, args.inprocess_seconds) for size in bench.sizes}
        pooled_ms = bench.lone_p50_ms(args.inprocess_seconds, via_pool=True)
        inline_ms = bench.lone_p50_ms(args.inprocess_seconds, via_pool=False)
        draft_ms, full_ms = large_jpeg_ms(bench.pre)
        best = max(rates, key=rates.__getitem__)
        print(
            f"12 MP JPEG -> {bench.pre.spec.crop}px input: {draft_ms:.1f} ms (draft), "
            f"{full_ms:.1f} ms (full)"
        )
        for size, rate in rates.items():
            print(f"in-process batch {size:4d}: {rate:8.1f} img/s")
        print(f"in-process ceiling: {rates[best]:.1f} img/s at batch {best}")
        print(
            f"in-process batch-1 p50: {pooled_ms:.2f} ms decoding in the pool (as the ceiling), "
            f"{inline_ms:.2f} ms all in one thread"
        )
        lone, rounds = measure_http(args, settings, name, images, bench, best)
    finally:
        bench.close()

    lone_p50 = percentiles_ms(lone.latencies)[0]
    ratios = sorted(http / ceiling for ceiling, http in rounds)
    median = float(np.median(ratios))
    spread = f" (median of {len(ratios)} rounds, {ratios[0]:.2f} to {ratios[-1]:.2f})"
    print(f"ratio HTTP / in-process: {median:.2f}" + (spread if len(ratios) > 1 else ""))
    print(
        f"lone request p50 - in-process batch-1 p50: {lone_p50 - pooled_ms:+.2f} ms "
        f"({lone_p50 - inline_ms:+.2f} ms against one thread)"
    )
    return 0


def measure_http(
    args: argparse.Namespace,
    settings: Settings,
    name: str,
    images: list[bytes],
    bench: InProcess,
    best: int,
) -> tuple[LoadResult, list[tuple[float, float]]]:
    """The lone client, then ``--repeat`` rounds of (ceiling, HTTP load), each as img/s.

    Each round times the ceiling again at the best batch size, right before its load: on
    a shared machine the two then see the same conditions, and the ratio does not use the
    sweep's maximum, which noise biases upwards.
    """
    server, url = (None, args.url) if args.url else start_server(settings.models_dir)
    rounds = []
    try:
        requests = build_requests(url, f"/predict?model={name}", images, "image/jpeg")
        lone = run_load(url, requests, concurrency=1, duration=args.lone_seconds, warmup=0.5)
        print(report("HTTP lone request   ", lone))
        for _ in range(args.repeat):
            ceiling = bench.rate(best, args.inprocess_seconds)
            before = batch_stats(url, name)
            load = run_load(
                url,
                requests,
                concurrency=args.concurrency,
                duration=args.duration,
                warmup=args.warmup,
                processes=args.client_processes,
            )
            after = batch_stats(url, name)
            batches, batched = after[0] - before[0], after[1] - before[1]
            mean = f", mean batch {batched / batches:.1f}" if batches else ""
            http = load.ok / load.seconds
            print(
                report(f"HTTP concurrency {args.concurrency:3d}", load)
                + f"  (ceiling {ceiling:.1f} img/s, ratio {http / ceiling:.2f}{mean})"
            )
            rounds.append((ceiling, http))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    return lone, rounds


if __name__ == "__main__":
    sys.exit(main())
