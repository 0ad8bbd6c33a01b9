"""``python -m tools.bench --workers 1,2 [--null]``: the same model served with each
``--workers`` count, side by side.

One server per worker count, all started first and loaded; then ``--repeat`` rounds, each
timing the in-process ceiling (decode + preprocess + ONNX Runtime at its best batch size,
the same threads) and then every server in turn under the same closed-loop load, so that
the machine's drift falls on all of them alike. Reported per worker count: the median
images/s and its range, the median p50 and p99 under load, the lone request's p50, the
ratio to the ceiling and to the first worker count.

``--null`` serves :mod:`tools.null_model` (a ResNet's contract and almost no compute), so
the figures are what the service itself carries.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.registry import BatchingSettings
from service.repository import scan
from service.settings import Settings
from tools.inprocess import InProcess, load_images
from tools.loadgen import build_requests, run_load
from tools.null_model import write_null_model


@dataclass
class Served:
    """One server (one worker count) and what it measured over the rounds."""

    workers: int
    process: subprocess.Popen[bytes]
    url: str
    lone_p50_ms: float = 0.0
    rates: list[float] = field(default_factory=list)
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # HTTP / ceiling, round by round


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Measure ``args.model`` (or the null model) at each of ``args.workers``."""
    from tools.bench import start_server  # the one way the benchmarks start a server

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        models = settings.models_dir
        name = args.model
        if args.null:
            models, name = Path(tmp), "null"
            write_null_model(models, size=args.null_size)
        entries = scan(models)
        name = name or next(iter(entries))
        if name not in entries:
            raise SystemExit(f"model {name} not found under {models}")
        path = entries[name].versions[entries[name].latest]
        images = load_images(args.images, args.count)
        print(f"model {name} ({path}); {len(images)} images from {args.images}")
        instances = BatchingSettings.of(settings, entries[name].overrides).instances
        bench = InProcess(path, images, settings, instances=instances)
        print(f"{instances} instance(s): the ceiling runs as many streams")
        servers: list[Served] = []
        try:
            rates = {size: bench.rate(size, args.inprocess_seconds) for size in bench.sizes}
            best = max(rates, key=rates.__getitem__)
            print(f"in-process ceiling: {rates[best]:.1f} img/s at batch {best}")
            for workers in args.workers:
                flags = ["--workers", str(workers), "--default-model", name, *args.server_arg]
                process, url = start_server(models, flags)
                servers.append(Served(workers, process, url))
            requests = {
                s.workers: build_requests(s.url, "/predict", images, "image/jpeg") for s in servers
            }
            for s in servers:
                lone = run_load(
                    s.url,
                    requests[s.workers],
                    concurrency=1,
                    duration=args.lone_seconds,
                    warmup=0.5,
                )
                s.lone_p50_ms = lone.percentiles_ms()[0]
            for round_ in range(args.repeat):
                ceiling = bench.rate(best, args.inprocess_seconds)
                for s in servers:
                    load = run_load(
                        s.url,
                        requests[s.workers],
                        concurrency=args.concurrency,
                        duration=args.duration,
                        warmup=args.warmup,
                        processes=args.client_processes,
                        client=args.client,
                    )
                    p50, _, p99 = load.percentiles_ms()
                    rate = load.ok / load.seconds
                    s.rates.append(rate)
                    s.p50s.append(p50)
                    s.p99s.append(p99)
                    s.ratios.append(rate / ceiling)
                    print(
                        f"round {round_ + 1} workers {s.workers}: {rate:8.1f} img/s  p50 "
                        f"{p50:7.2f} ms  p99 {p99:7.2f} ms  errors {load.errors}  (ceiling "
                        f"{ceiling:.1f} img/s, ratio {rate / ceiling:.2f})"
                    )
        finally:
            bench.close()
            for s in servers:
                s.process.terminate()
                s.process.wait(60)
    summarize(servers, args.concurrency)
    return 0


def summarize(servers: list[Served], concurrency: int) -> None:
    """Medians over the rounds, and each worker count against the first, round by round."""
    first = servers[0]
    print(f"\n{concurrency} clients, medians of {len(first.rates)} rounds:")
    for s in servers:
        scale = sorted(r / f for r, f in zip(s.rates, first.rates, strict=True))
        print(
            f"workers {s.workers}: {np.median(s.rates):8.1f} img/s ({min(s.rates):.1f} to "
            f"{max(s.rates):.1f})  p50 {np.median(s.p50s):7.2f} ms  p99 {np.median(s.p99s):7.2f}"
            f" ms  lone p50 {s.lone_p50_ms:.2f} ms  HTTP/ceiling {np.median(s.ratios):.2f}  "
            f"x workers {first.workers}: {np.median(scale):.2f} ({scale[0]:.2f} to {scale[-1]:.2f})"
        )
