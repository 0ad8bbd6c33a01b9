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

With ``--compare OTHER`` (a second model of the same repository, e.g. its int8 variant)
every step is run for both models on the same images with the same client, the two
interleaved within each round, and the rounds end with OTHER's figures as a multiple of
the first model's (in-process and over HTTP, median and range).

It starts its own server (``python -m service``, settings from the same RESNET_SERVE_*
environment) unless ``--url`` points at a running one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.registry import BatchingSettings
from service.repository import scan
from service.settings import Settings, load_settings
from tools import scaling
from tools.inprocess import InProcess, large_jpeg_ms, load_images
from tools.loadgen import CLIENTS, LoadResult, build_requests, percentiles_ms, run_load

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-train.tar.gz"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, default=None, help="model repository [settings]")
    p.add_argument("--model", default=None, help="model name (default: the first)")
    p.add_argument(
        "--compare", default=None, metavar="MODEL", help="a second model, measured alongside"
    )
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
        "--client",
        choices=CLIENTS,
        default="python",
        help="the loaded rounds' client: this package's asyncio one, or wrk (the peer kit's C "
        "client, which leaves more of the shared cores to the server; needs wrk installed)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (ceiling at the best batch size, HTTP load); the median ratio is"
        " reported (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_counts,
        default=None,
        metavar="N,M",
        help="serve with each --workers count and compare them (tools.scaling)",
    )
    p.add_argument(
        "--null", action="store_true", help="with --workers: the near-zero-compute model"
    )
    p.add_argument("--null-size", type=int, default=224, help="the null model's input side")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="with --workers: a flag for the servers (repeat; e.g. --server-arg=--max-delay-ms=2);"
        " set instances with RESNET_SERVE_INSTANCES or config.json, which the ceiling follows",
    )
    args = p.parse_args(argv)
    if args.null and args.workers is None:
        p.error("--null measures worker counts: add --workers, e.g. --workers 1,2")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts are positive, got {text!r}")
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: Path, flags: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "service", "--models", str(models), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", *flags]
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
    p50, p95, p99 = result.percentiles_ms()
    rate = result.ok / result.seconds if result.seconds else 0.0
    return (
        f"{name}: {rate:8.1f} img/s  p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms  "
        f"ok {result.ok}  errors {result.errors}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client == "wrk" and shutil.which("wrk") is None:
        print("python -m tools.bench: --client wrk needs wrk on the PATH", file=sys.stderr)
        return 2
    settings = load_settings(**({"models_dir": args.models} if args.models else {}))
    if args.workers is not None:
        return scaling.run(args, settings)
    entries = scan(settings.models_dir)
    name: str = args.model or next(iter(entries), "(any)")
    names = [name] if args.compare is None else [name, args.compare]
    for wanted in names:
        if wanted not in entries:
            raise SystemExit(
                f"model {wanted} not found under {settings.models_dir}; export one, e.g. "
                f"python -m export resnet50 --weights none --out {settings.models_dir} "
                "--name resnet50"
            )
    images = load_images(args.images, args.count)
    print(f"{len(images)} images from {args.images}")
    print(
        f"threads: intra-op {settings.intra_op_threads or 'auto'}, preprocess "
        f"{settings.effective_preprocess_threads()}, cores {os.cpu_count()}"
    )
    benches = {}
    try:
        for model in names:
            path = entries[model].versions[entries[model].latest]
            instances = BatchingSettings.of(settings, entries[model].overrides).instances
            benches[model] = Model(model, path, images, settings, instances)
            benches[model].sweep(args.inprocess_seconds)
        measure_http(args, settings, images, list(benches.values()))
    finally:
        for bench in benches.values():
            bench.inprocess.close()
    for bench in benches.values():
        bench.summary()
    if args.compare is not None:
        compare(benches[names[0]], benches[names[1]])
    return 0


class Model:
    """One model's in-process ceiling and HTTP figures, gathered over the rounds."""

    def __init__(
        self, name: str, path: Path, images: list[bytes], settings: Settings, instances: int
    ) -> None:
        self.name = name
        self.inprocess = InProcess(path, images, settings, instances=instances)
        print(f"{name}: {instances} instance(s), the ceiling runs as many streams")
        self.prefix = ""
        self.best = 1
        self.pooled_ms = self.inline_ms = 0.0
        self.lone: LoadResult | None = None
        self.rounds: list[tuple[float, float]] = []  # (ceiling, HTTP) img/s
        print(f"model {name} ({path}, {self.inprocess.engine.card.precision})")

    def sweep(self, seconds: float) -> None:
        """Every batch size in-process, the lone latency, and a 12 MP JPEG's preprocessing."""
        bench = self.inprocess
        rates = {size: bench.rate(size, seconds) for size in bench.sizes}
        self.pooled_ms = bench.lone_p50_ms(seconds, via_pool=True)
        self.inline_ms = bench.lone_p50_ms(seconds, via_pool=False)
        draft_ms, full_ms = large_jpeg_ms(bench.pre)
        self.best = max(rates, key=rates.__getitem__)
        print(
            f"12 MP JPEG -> {bench.pre.spec.crop}px input: {draft_ms:.1f} ms (draft), "
            f"{full_ms:.1f} ms (full)"
        )
        for size, rate in rates.items():
            print(f"in-process batch {size:4d}: {rate:8.1f} img/s")
        print(f"in-process ceiling: {rates[self.best]:.1f} img/s at batch {self.best}")
        print(
            f"in-process batch-1 p50: {self.pooled_ms:.2f} ms decoding in the pool (as the "
            f"ceiling), {self.inline_ms:.2f} ms all in one thread"
        )

    def summary(self) -> None:
        if self.lone is None or not self.rounds:
            return
        ratios = sorted(http / ceiling for ceiling, http in self.rounds)
        median = float(np.median(ratios))
        spread = f" (median of {len(ratios)} rounds, {ratios[0]:.2f} to {ratios[-1]:.2f})"
        print(
            f"{self.prefix}ratio HTTP / in-process: {median:.2f}"
            + (spread if len(ratios) > 1 else "")
        )
        lone_p50 = percentiles_ms(self.lone.latencies)[0]
        print(
            f"{self.prefix}lone request p50 - in-process batch-1 p50: "
            f"{lone_p50 - self.pooled_ms:+.2f} ms ({lone_p50 - self.inline_ms:+.2f} ms against "
            "one thread)"
        )


def compare(first: Model, other: Model) -> None:
    """``other`` as a multiple of ``first``, round by round (each pair measured back to back)."""
    for what, index in (("in-process", 0), ("HTTP", 1)):
        ratios = sorted(
            b[index] / a[index] for a, b in zip(first.rounds, other.rounds, strict=True)
        )
        print(
            f"{other.name} / {first.name} {what}: {float(np.median(ratios)):.2f}x "
            f"(median of {len(ratios)} rounds, {ratios[0]:.2f} to {ratios[-1]:.2f})"
        )


def measure_http(
    args: argparse.Namespace, settings: Settings, images: list[bytes], models: list[Model]
) -> None:
    """Each model's lone client, then ``--repeat`` rounds of (ceiling, HTTP load) per model.

    Each round times the ceiling again at the best batch size, right before its load: on
    a shared machine the two then see the same conditions, and the ratio does not use the
    sweep's maximum, which noise biases upwards. With two models, their measurements
    alternate within every round for the same reason.
    """
    server, url = (None, args.url) if args.url else start_server(settings.models_dir)
    for model in models:
        model.prefix = f"{model.name}: " if len(models) > 1 else ""
    try:
        requests = {
            m.name: build_requests(url, f"/predict?model={m.name}", images, "image/jpeg")
            for m in models
        }
        for model in models:
            model.lone = run_load(
                url, requests[model.name], concurrency=1, duration=args.lone_seconds, warmup=0.5
            )
            print(report(f"{model.prefix}HTTP lone request   ", model.lone))
        for _ in range(args.repeat):
            for model in models:
                ceiling = model.inprocess.rate(model.best, args.inprocess_seconds)
                before = batch_stats(url, model.name)
                load = run_load(
                    url,
                    requests[model.name],
                    concurrency=args.concurrency,
                    duration=args.duration,
                    warmup=args.warmup,
                    processes=args.client_processes,
                    client=args.client,
                )
                after = batch_stats(url, model.name)
                batches, batched = after[0] - before[0], after[1] - before[1]
                mean = f", mean batch {batched / batches:.1f}" if batches else ""
                http = load.ok / load.seconds
                print(
                    report(f"{model.prefix}HTTP concurrency {args.concurrency:3d}", load)
                    + f"  (ceiling {ceiling:.1f} img/s, ratio {http / ceiling:.2f}{mean})"
                )
                model.rounds.append((ceiling, http))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
