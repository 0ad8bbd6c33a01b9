"""A lean HTTP/1.1 load generator for ``python -m tools.bench``.

Each connection is kept alive and sends pre-built requests back to back (closed loop), so
the offered concurrency is the number of connections. It is written on asyncio streams,
not on a general HTTP client, because the client shares the machine's cores with the
server: a client that spends 300 us of CPU per request (typical of full-featured clients)
would cap the very throughput it measures. It runs in its own process(es).

``client="wrk"`` loads the server with wrk instead (the C client of the peer kit in
../shared/peers), sending the same raw requests: it spends less of the shared cores per
request than any Python client, which matters most for small models, where the client's
CPU is a large share of the machine. It reports wrk's own percentiles.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

CLIENTS = ("python", "wrk")


def percentiles_ms(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 of latencies in seconds, in milliseconds (NaN when empty)."""
    if not values:
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 95, 99])
    return float(p50), float(p95), float(p99)


@dataclass
class LoadResult:
    """What the connections saw during the measured window."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # connection errors, timeouts
    seconds: float = 0.0
    quantiles: tuple[float, float, float] | None = None
    """p50, p95, p99 in seconds, where the client reports them instead of each latency."""

    def percentiles_ms(self) -> tuple[float, float, float]:
        """p50, p95 and p99 latency in milliseconds (NaN without any request)."""
        if self.quantiles is not None:
            p50, p95, p99 = (q * 1000.0 for q in self.quantiles)
            return p50, p95, p99
        return percentiles_ms(self.latencies)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return self.failures + sum(n for status, n in self.statuses.items() if status != 200)

    def merge(self, other: LoadResult) -> None:
        self.latencies += other.latencies
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        self.failures += other.failures
        self.seconds = max(self.seconds, other.seconds)


def build_requests(url: str, path: str, bodies: list[bytes], content_type: str) -> list[bytes]:
    """Raw HTTP/1.1 POST requests, one per body."""
    host = urlsplit(url).netloc
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n"
        ).encode("latin-1")
        + body
        for body in bodies
    ]


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    offset: int,
    start: float,
    stop: float,
    result: LoadResult,
) -> None:
    index = offset
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.perf_counter() < stop:
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            sent = time.perf_counter()
            writer.write(requests[index % len(requests)])
            index += 1
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            result.failures += 1
            if conn is not None:
                conn[1].close()
            conn = None
            continue
        if sent >= start:  # requests sent during the warm-up are not counted
            result.latencies.append(done - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1
    if conn is not None:
        conn[1].close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (as uvicorn[standard] installs it): it spends about half
    the CPU per request of asyncio's own, CPU the server under test then has."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run_process(
    url: str, requests: list[bytes], connections: int, offset: int, warmup: float, duration: float
) -> LoadResult:
    parts = urlsplit(url)
    result = LoadResult()

    async def main() -> None:
        start = time.perf_counter() + warmup
        stop = start + duration
        await asyncio.gather(
            *(
                _connection(
                    parts.hostname or "127.0.0.1",
                    parts.port or 80,
                    requests,
                    offset + 7 * i,
                    start,
                    stop,
                    result,
                )
                for i in range(connections)
            )
        )

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    result.seconds = duration
    return result


def run_load(
    url: str,
    requests: list[bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    processes: int = 1,
    client: str = "python",
) -> LoadResult:
    """``concurrency`` closed-loop connections for ``warmup + duration`` seconds."""
    if client == "wrk":
        return run_wrk(url, requests, concurrency=concurrency, duration=duration, warmup=warmup)
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.starmap(
            _run_process,
            [(url, requests, n, 1000 * i, warmup, duration) for i, n in enumerate(shares)],
        )
    total = LoadResult()
    for part in parts:
        total.merge(part)
    return total


WRK_SCRIPT = r"""
local reqs, idx = {}, 0
function init(args)
  local f = assert(io.open(args[1], "rb"))
  while true do
    local n = f:read("*l")
    if not n then break end
    reqs[#reqs + 1] = f:read(tonumber(n))
  end
  f:close()
end
function request()
  idx = idx % #reqs + 1
  return reqs[idx]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


class WrkMissing(RuntimeError):
    """wrk is not installed."""


def run_wrk(
    url: str, requests: list[bytes], *, concurrency: int, duration: float, warmup: float
) -> LoadResult:
    """The same load as :func:`run_load`, generated by wrk (one thread, ``concurrency``
    connections): a warm-up run, discarded, then the measured one."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkMissing("--client wrk needs wrk on the PATH (e.g. apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="loadgen-wrk-") as tmp:
        script, data = Path(tmp) / "requests.lua", Path(tmp) / "requests.bin"
        script.write_text(WRK_SCRIPT)
        data.write_bytes(b"".join(b"%d\n%s" % (len(r), r) for r in requests))

        def once(seconds: float) -> str:
            command = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s"]
            command += ["--timeout", "30s", "-s", str(script), url, "--", str(data)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            return done.stdout

        if warmup > 0:
            once(warmup)
        found = re.search(r"^RESULT ((?:\d+ ?){7})$", once(duration), re.MULTILINE)
    if found is None:
        raise RuntimeError("wrk printed no result line")
    total, micros, non_2xx, failures, *quantiles = (int(v) for v in found.group(1).split())
    p50, p95, p99 = (q / 1e6 for q in quantiles)
    return LoadResult(
        statuses={200: total - non_2xx, 0: non_2xx} if non_2xx else {200: total},
        failures=failures,
        seconds=micros / 1e6,
        quantiles=(p50, p95, p99),
    )
