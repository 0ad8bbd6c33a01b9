"""A bounded pool of workers sending batches of images, results recorded in path order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.client.errors import Fatal
from service.client.sender import Answer, Rejected, Result, Sender


@dataclass
class Tally:
    """What became of the images sent in this run."""

    done: int = 0
    """Answered and recorded."""
    rejected: int = 0
    """Refused for what they are (recorded with their error)."""
    unfinished: int = 0
    """The server kept failing (not recorded: a rerun sends them again)."""
    retried: int = 0
    """Requests sent again after a 429 or 5xx answer or a lost connection."""
    last_failure: str = ""
    """What the server last answered an unfinished image with."""


async def send_all(
    root: Path,
    paths: list[str],
    sender: Sender,
    record: Callable[[str, Result], None],
    tally: Tally,
    *,
    batch_size: int,
    concurrency: int,
    progress: Callable[[int], object],
) -> None:
    """Send ``paths`` (relative to ``root``) in batches, at most ``concurrency`` at once.

    Answers are recorded in the order of ``paths`` whatever order they arrive in (a batch
    waits for those before it), so that the output of a run is deterministic and what is
    recorded is always a prefix of the work (less images left for a rerun). ``tally`` counts as
    records are made, so it is right however the run ends. Raises :class:`Fatal` from any
    worker after the others are cancelled.
    """
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    queue = iter(enumerate(batches))  # shared: each worker takes the next batch
    answered: dict[int, list[tuple[str, Answer]]] = {}
    next_batch = 0

    def record_ready() -> None:
        nonlocal next_batch
        while next_batch in answered:
            for path, answer in answered.pop(next_batch):
                if answer is None:
                    tally.unfinished += 1
                    continue
                record(path, answer)
                if isinstance(answer, Rejected):
                    tally.rejected += 1
                else:
                    tally.done += 1
            progress(len(batches[next_batch]))
            next_batch += 1

    async def worker() -> None:
        for index, batch in queue:
            answers: dict[str, Answer] = {}
            images: list[tuple[str, bytes]] = []
            for path in batch:
                try:
                    images.append((path, (root / path).read_bytes()))
                except OSError as exc:
                    answers[path] = Rejected(0, "unreadable", f"cannot read the file: {exc}")
            if images:
                sent = await sender.send(images)
                answers.update(zip((path for path, _ in images), sent, strict=True))
            answered[index] = [(path, answers[path]) for path in batch]
            record_ready()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(batches))):
                group.create_task(worker())
    except* Fatal as failures:
        raise failures.exceptions[0] from None
