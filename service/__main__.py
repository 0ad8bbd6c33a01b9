"""``python -m service``: validate the settings, print them, and serve with uvicorn.

Every setting has a flag (``--max-batch-size 16``) and an environment variable
(``RESNET_SERVE_MAX_BATCH_SIZE=16``); flags win. ``--models`` is short for
``--models-dir``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys

import onnxruntime
import uvicorn

from service import __version__, supervisor
from service.app import create_app
from service.engine import cuda_missing
from service.logs import configure_logging
from service.memory import keep_freed_memory
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

log = logging.getLogger("service")

ALIASES = {"models_dir": ["--models"]}


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting, generated from ``Settings`` so the two never drift apart."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the ONNX models of a model repository over HTTP.",
        epilog=f"Every flag also reads an environment variable, {ENV_PREFIX}<NAME>; flags win.",
    )
    for name, field in Settings.model_fields.items():
        flags = [*ALIASES.get(name, []), "--" + name.replace("_", "-")]
        default = field.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            *flags,
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [{ENV_PREFIX}{name.upper()}, default: {shown}]",
        )
    return parser


def banner(settings: Settings, flags: set[str]) -> str:
    """The effective configuration, one setting a line, with where each value came from."""
    lines = [
        f"resnet-serve {__version__} (onnxruntime {onnxruntime.__version__}, "
        f"providers available: {', '.join(onnxruntime.get_available_providers())})",
    ]
    for name, env, value in settings.as_rows():
        source = "flag" if name in flags else "env" if env in os.environ else "default"
        lines.append(f"  {name:<24} {value:<28} ({source}, {env})")
    return "\n".join(lines)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = load_settings(**flags)
    except SettingsError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    missing = cuda_missing(onnxruntime.get_available_providers())
    if settings.require_gpu and missing is not None:
        print(f"python -m service: require_gpu is on, but {missing}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    keep_freed_memory()
    if settings.log_format == "json":  # one JSON line, like every other line
        log.info("%s", banner(settings, set(flags)))
    else:
        print(banner(settings, set(flags)), flush=True)
    if settings.workers > 1:
        if not hasattr(os, "memfd_create"):  # the shared memory between the processes
            print("python -m service: --workers above 1 needs Linux", file=sys.stderr)
            return 2
        return supervisor.serve(settings)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal; with this
    # handler in place the process then exits 0 instead of dying by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # service.logs configured every logger, uvicorn's included
        access_log=settings.access_log,
        # SIGTERM: stop accepting, let requests in flight (and so everything queued)
        # finish for up to this long, then shut the app down (the batchers drain too).
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
