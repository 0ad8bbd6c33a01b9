"""``tools/gpu_check.sh``: is the GPU really used, does it agree with the CPU, how fast is it.

On a machine with an NVIDIA GPU and ``onnxruntime-gpu``, in a few minutes:

1. the model's nodes by provider, from ONNX Runtime's own profile: CUDA (or TensorRT when
   present) must run the convolutions, not fall back to the CPU in silence;
2. GPU against CPU on the same batch: max logit difference and top-1 agreement;
3. engine images/s at batch 1 to 256 (data already on the host, as the service feeds it);
4. the HTTP service (``--workers``, two instances, a small batching delay) under 64 to 256
   closed-loop clients sending real JPEGs: images/s and p50/p99.

``--provider cpu`` runs the same steps on the CPU (the test suite does, on a small model:
the script's logic is checked where no GPU is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engine import CPU, Engine
from tools.inprocess import load_images
from tools.loadgen import build_requests, percentiles_ms, run_load

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": CPU}


def nodes_by_provider(model: Path, providers: list[str], size: int) -> Counter[str]:
    """How many of the graph's nodes each provider ran, from ONNX Runtime's profile."""
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model), options, providers=providers)
        session.run(None, {"input": np.zeros((1, 3, size, size), np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    return Counter(
        e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and "provider" in e.get("args", {})
    )


def engine_rates(engine: Engine, batches: list[int], seconds: float) -> dict[int, float]:
    """Images/s of the engine alone at each batch size (host arrays in, host arrays out)."""
    size = engine.input_size
    rates = {}
    for n in batches:
        batch = np.random.default_rng(0).standard_normal((n, 3, size, size), dtype=np.float32)
        engine.run(batch)  # allocation and algorithm search happen once, here
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done < 3 * n:
            engine.run(batch)
            done += n
        rates[n] = done / (time.perf_counter() - start)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model.onnx of this project")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    p.add_argument("--images", type=Path, required=True, help="JPEGs for the HTTP step")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--clients", default="64,128,256")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    wanted = PROVIDERS[args.provider]
    available = ort.get_available_providers()
    if wanted not in available:
        print(f"gpu_check: {wanted} is not in this onnxruntime ({available})", file=sys.stderr)
        return 2
    providers = [wanted, CPU] if wanted != CPU else [CPU]
    if wanted == PROVIDERS["tensorrt"]:
        providers.insert(1, PROVIDERS["cuda"])
    engine = Engine(args.model, providers=tuple(providers), require_gpu=wanted != CPU)
    size = engine.input_size
    counts = nodes_by_provider(args.model, providers, size)
    print(f"1. nodes by provider: {dict(counts)} (session: {engine.session.get_providers()})")
    if counts.get(wanted, 0) == 0:
        print(f"gpu_check: FAILED: no node ran on {wanted}", file=sys.stderr)
        return 1
    batch = np.random.default_rng(1).standard_normal((8, 3, size, size), dtype=np.float32)
    on_cpu = Engine(args.model, providers=("cpu",)).run(batch)["logits"]
    here = engine.run(batch)["logits"]
    diff = float(np.abs(here - on_cpu).max())
    agree = float((here.argmax(1) == on_cpu.argmax(1)).mean())
    print(f"2. {wanted} vs CPU on 8 images: max |logit diff| {diff:.2e}, top-1 agree {agree:.0%}")
    batches = [int(b) for b in args.batches.split(",")]
    for n, rate in engine_rates(engine, batches, args.seconds).items():
        print(f"3. engine batch {n:4d}: {rate:10.1f} img/s")
    return http_step(args, engine)


def http_step(args: argparse.Namespace, engine: Engine) -> int:
    """The service under load: a real server on the same model and provider."""
    import subprocess

    from tools.bench import start_server

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model" / "1").mkdir(parents=True)
        (Path(tmp) / "model" / "1" / "model.onnx").symlink_to(args.model.resolve())
        flags = ["--providers", args.provider, "--workers", str(args.workers)]
        flags += ["--instances", "2", "--max-batch-size", "256", "--max-delay-ms", "2"]
        server: subprocess.Popen[bytes] | None = None
        try:
            server, url = start_server(Path(tmp), flags)
            images = load_images(args.images, 64)
            requests = build_requests(url, "/predict", images, "image/jpeg")
            for clients in (int(c) for c in args.clients.split(",")):
                load = run_load(
                    url,
                    requests,
                    concurrency=clients,
                    duration=args.seconds,
                    warmup=1.0,
                    processes=max(1, min(4, clients // 32)),
                )
                p50, _, p99 = percentiles_ms(load.latencies)
                print(
                    f"4. HTTP {clients:4d} clients, workers {args.workers}: "
                    f"{load.ok / load.seconds:9.1f} img/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
                    f"errors {load.errors}"
                )
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
