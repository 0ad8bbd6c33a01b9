"""``--workers N``: N front-end processes on one port, and one engine process behind them.

The supervisor (this process) binds the port, starts the engine process
(:mod:`service.engine_process`) and N front ends (uvicorn, each with the app in front-end
mode), and watches them:

* a front end that dies is started again; its clients' connections were reset with it,
  and the engine drops the images it had queued;
* an engine process that dies is started again; meanwhile every front end answers 503
  and /readyz says why, then reconnects and serves once the models are loaded again;
* SIGTERM (or SIGINT) drains: the front ends stop accepting and finish their requests
  (which still need the engine), then the engine finishes what is queued; exit 0.

Metrics use prometheus_client's multiprocess mode: every process writes its values to a
private directory, and a scrape of any front end adds them up (``Metrics.exposition``).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import multiprocess

from service.logs import configure_logging
from service.memory import keep_freed_memory
from service.metrics import MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger("service.supervisor")

RESTART_PAUSE_S = 0.5
"""Pause before restarting a process that died, so a crash loop does not spin."""
_spawn = multiprocessing.get_context("spawn")


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _follow_parent() -> None:
    """Stop this child (gracefully) if the supervisor dies without stopping it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def run_engine(settings: Settings, path: str) -> None:
    """The engine process's target."""
    from service import engine_process

    keep_freed_memory()
    _follow_parent()
    engine_process.main(settings, path)


def run_front_end(settings: Settings, sock: socket.socket, engine_path: str) -> None:
    """A front-end process's target: uvicorn serving the app on the shared socket."""
    from service.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    keep_freed_memory()
    _follow_parent()
    # uvicorn drains on SIGTERM, then re-raises it: exit 0 instead of dying by it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    config = uvicorn.Config(
        create_app(settings, engine_path=engine_path),
        log_level=settings.log_level,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts, watches, restarts and stops the engine and front-end processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = Path(tempfile.mkdtemp(prefix="resnet-serve-"))  # mode 0700
        self.engine_path = str(self.runtime / "engine.sock")
        metrics_dir = self.runtime / "metrics"
        metrics_dir.mkdir()
        # Read by prometheus_client when each child imports it (spawned children).
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        config = uvicorn.Config(
            "service.app:create_app", host=settings.host, port=settings.port, log_config=None
        )
        self.sock = config.bind_socket()
        self.engine: BaseProcess | None = None
        self.front_ends: list[BaseProcess] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)

    def _start_engine(self) -> BaseProcess:
        process = _spawn.Process(
            target=run_engine, args=(self.settings, self.engine_path), name="engine"
        )
        process.start()
        log.info("engine process %d started", process.pid)
        return process

    def _start_front_end(self, index: int) -> BaseProcess:
        process = _spawn.Process(
            target=run_front_end,
            args=(self.settings, self.sock, self.engine_path),
            name=f"front-end-{index}",
        )
        process.start()
        log.info("front end %d started (pid %d)", index, process.pid)
        return process

    def request_stop(self, signum: int, frame: object) -> None:
        self._stop.set()
        self._wake_w.send_bytes(b"stop")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean drain)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        try:
            self.engine = self._start_engine()
            self.front_ends = [self._start_front_end(i) for i in range(self.settings.workers)]
            self._watch()
            self._drain()
        finally:
            self.sock.close()
            shutil.rmtree(self.runtime, ignore_errors=True)
        return 0

    def _watch(self) -> None:
        while not self._stop.is_set():
            engine = self.engine
            if engine is None:
                raise RuntimeError("the engine process was never started")
            sentinels: list[Any] = [
                engine.sentinel,
                *(p.sentinel for p in self.front_ends),
                self._wake_r,
            ]
            multiprocessing.connection.wait(sentinels)
            if self._stop.is_set():
                return
            if not engine.is_alive():
                log.error(
                    "engine process %d died (exit %s): restarting it", engine.pid, engine.exitcode
                )
                self._reap(engine)
                self.engine = self._start_engine()
            for i, process in enumerate(self.front_ends):
                if not process.is_alive():
                    log.error(
                        "front end %d (pid %d) died (exit %s): restarting it",
                        i,
                        process.pid,
                        process.exitcode,
                    )
                    self._reap(process)
                    self.front_ends[i] = self._start_front_end(i)

    def _reap(self, process: BaseProcess) -> None:
        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid)  # its live gauges go with it
        time.sleep(RESTART_PAUSE_S)

    def _drain(self) -> None:
        """Front ends first (their requests need the engine), then the engine."""
        grace = self.settings.drain_timeout_s + 10.0
        log.info("draining: stopping %d front ends, then the engine", len(self.front_ends))
        for process in self.front_ends:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace
        for process in self.front_ends:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("front end %d did not stop in %.0f s: killing it", process.pid, grace)
                process.kill()
                process.join()
        if self.engine is not None and self.engine.is_alive():
            self.engine.terminate()
            self.engine.join(grace)
            if self.engine.is_alive():
                log.warning("engine process did not stop in %.0f s: killing it", grace)
                self.engine.kill()
                self.engine.join()
        log.info("stopped")


def serve(settings: Settings) -> int:
    """Run the multi-process server (``python -m service --workers N``, N > 1)."""
    return Supervisor(settings).run()
