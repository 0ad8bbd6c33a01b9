"""A real ``python -m service`` process on a free port, for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
BATCHED = "batched"
"""A second model (same file) whose config.json makes batches easy to observe."""


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> int:
        """SIGTERM, as a process manager would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: Path, log: Path, *flags: str, ready: bool = True) -> Server:
    """Start the service and wait until it answers /healthz (and /readyz when ``ready``)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--models", str(models)]
    command += ["--host", "127.0.0.1", "--port", str(port), *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    path = "/readyz" if ready else "/healthz"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited early:\n{log.read_text()}")
        try:
            if httpx.get(server.url + path, timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the service did not answer {path} within 120 s:\n{log.read_text()}")


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll an observable condition (not a fixed sleep) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
