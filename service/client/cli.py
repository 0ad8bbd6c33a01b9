"""``resnet-client``: the command line, one run from the folder scan to the summary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from service.client.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Fatal,
)
from service.client.folder import IMAGE_EXTENSIONS, scan
from service.client.outputs import Output, open_output
from service.client.runner import Tally, send_all
from service.client.sender import Sender, describe

log = logging.getLogger("service.client")

DESCRIPTION = """\
Send every image under a folder to a resnet-serve server: top-k predictions to a .jsonl
or .csv file, or embeddings to a .npy file with an index of paths. Rerun the same command
after an interruption to resume. Exit status: 0 every image done, 1 some images failed
(see the summary), 2 bad arguments or a request the server refuses (unknown model, API
key), 3 server unreachable or lost, 130 interrupted."""


def _url(value: str) -> str:
    try:
        valid = value.startswith(("http://", "https://")) and bool(httpx.URL(value).host)
    except httpx.InvalidURL:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The ``predict`` and ``embed`` commands and their flags."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dir", type=Path, metavar="DIR", help="folder of images (recursive)")
    common.add_argument(
        "--url",
        type=_url,
        default=os.environ.get("RESNET_CLIENT_URL", "http://localhost:8000"),
        help="the server (default: $RESNET_CLIENT_URL or %(default)s)",
    )
    common.add_argument("--model", help="model name (default: the server's default model)")
    common.add_argument("--model-version", type=_positive, help="model version (default: latest)")
    common.add_argument(
        "--api-key",
        default=os.environ.get("RESNET_CLIENT_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $RESNET_CLIENT_API_KEY)",
    )
    common.add_argument("--concurrency", type=_positive, default=8, help="requests in flight")
    common.add_argument("--batch-size", type=_positive, default=8, help="images per request")
    common.add_argument(
        "--retries",
        type=_count,
        default=5,
        help="retries of a request on 503/504 (after Retry-After) or a lost connection",
    )
    common.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per request")
    common.add_argument(
        "--limit", type=_positive, help="send at most this many images now (rerun for more)"
    )
    common.add_argument(
        "--overwrite", action="store_true", help="start afresh instead of resuming --out"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("-v", "--verbose", action="store_true", help="log every retry")

    parser = argparse.ArgumentParser(prog="resnet-client", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict", parents=[common], help="top-k classes of each image to .jsonl or .csv"
    )
    predict.add_argument("--out", type=Path, required=True, help="preds.jsonl or preds.csv")
    predict.add_argument(
        "--top-k",
        type=_positive,
        help="classes per image (default: the server's, 5 or every class of a smaller model)",
    )
    embed = commands.add_parser(
        "embed", parents=[common], help="embeddings to .npy, float32 [N, D], plus .paths.txt"
    )
    embed.add_argument("--out", type=Path, required=True, help="feats.npy")
    embed.add_argument("--normalize", action="store_true", help="L2-normalized embeddings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see :mod:`service.client.errors`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="resnet-client: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except Fatal as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:  # the output cannot be written: disk full, permissions
        _say(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:  # before or after the run, which handles its own
        _say("interrupted")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.command == "embed" and args.out.suffix != ".npy":
        raise Fatal(f"--out {args.out}: embeddings go to a .npy file", EXIT_USAGE)
    if not args.dir.is_dir():
        raise Fatal(f"{args.dir} is not a folder", EXIT_USAGE)
    identity = {"dir": str(args.dir.resolve()), "model": args.model}
    identity |= {"version": args.model_version, "normalize": getattr(args, "normalize", False)}
    top_k = getattr(args, "top_k", None)
    output = open_output(args.out, top_k=top_k, identity=identity, overwrite=args.overwrite)
    folder = scan(args.dir, ignore=output.files())
    if not folder.images:
        known = " ".join(sorted(IMAGE_EXTENSIONS))
        raise Fatal(
            f"no images under {args.dir} ({len(folder.skipped)} other files); "
            f"images are files named {known}",
            EXIT_USAGE,
        )
    todo = [path for path in folder.images if path not in output.done]
    already = len(folder.images) - len(todo)
    left = max(len(todo) - (args.limit or len(todo)), 0)
    todo = todo[: args.limit]

    tally, failure, interrupted = Tally(), None, False
    bar = tqdm(total=len(todo), unit="img", desc=args.command, disable=args.no_progress or None)
    started = time.monotonic()
    try:
        with logging_redirect_tqdm():
            asyncio.run(_send(args, todo, output, tally, bar))
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    except Fatal as exc:
        failure = exc
    finally:
        bar.close()
        elapsed = time.monotonic() - started
        complete = not (interrupted or failure or left > 0 or tally.unfinished)
        where = output.close(complete=complete)

    sent = tally.done + tally.rejected
    if failure is not None and sent == 0:
        _say(f"error: {failure}")
        return failure.exit_code
    _say(
        f"done {tally.done}, failed {tally.rejected + tally.unfinished}, "
        f"skipped {len(folder.skipped)} (not images), "
        f"already done {already}, retries {tally.retried}; "
        f"{sent} images in {elapsed:.2f} s ({sent / max(elapsed, 1e-9):.1f} img/s)"
    )
    _say(where)
    if tally.rejected:
        _say(f"{tally.rejected} images rejected by the server, recorded with their error")
    if failure is not None:
        resume = "; rerun the same command to resume" if failure.exit_code != EXIT_USAGE else ""
        _say(f"error: {failure}{resume}")
        return failure.exit_code
    if interrupted:
        _say("interrupted; rerun the same command to resume")
        return EXIT_INTERRUPTED
    if tally.unfinished:
        _say(
            f"{tally.unfinished} images not done: the server kept answering "
            f"{tally.last_failure}; rerun the same command to send them again"
        )
    if left > 0:
        _say(f"stopped after --limit {args.limit}; {left} images left: rerun to continue")
    return EXIT_FAILED if tally.rejected or tally.unfinished else EXIT_OK


async def _send(
    args: argparse.Namespace, todo: list[str], output: Output, tally: Tally, bar: tqdm[Any]
) -> None:
    """Check that the server answers, then send ``todo``; SIGTERM acts as Ctrl-C."""
    if not todo:
        return
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.url, limits=limits, timeout=args.timeout, headers=headers
    ) as client:
        await _check_server(client)
        params = {"model": args.model, "version": args.model_version}
        if args.command == "predict":
            params["top_k"] = args.top_k
        elif args.normalize:
            params["normalize"] = "true"
        query = {key: str(value) for key, value in params.items() if value is not None}
        sender = Sender(client, "/" + args.command, query, retries=args.retries)
        try:
            await send_all(
                args.dir,
                todo,
                sender,
                output.write,
                tally,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                progress=bar.update,
            )
        finally:
            tally.retried, tally.last_failure = sender.retried, sender.last_failure


async def _check_server(client: httpx.AsyncClient) -> None:
    """Fail fast, in one line, on a server that is down or a URL that is not one."""
    url = str(client.base_url).rstrip("/")
    try:
        response = await client.get("/healthz")
    except httpx.TransportError as exc:
        raise Fatal(
            f"cannot reach {url}: {describe(exc)}; is the server running, and is --url right?",
            EXIT_UNREACHABLE,
        ) from None
    if response.status_code != 200:
        raise Fatal(
            f"{url}/healthz answered {response.status_code}: is --url a resnet-serve server?",
            EXIT_UNREACHABLE,
        )


def _say(line: str) -> None:
    print(f"resnet-client: {line}", file=sys.stderr)
