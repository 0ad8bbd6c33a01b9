"""How a run of the client ends: its exit codes, and the one error that stops a run."""

from __future__ import annotations

EXIT_OK = 0
"""Every image has its result."""
EXIT_FAILED = 1
"""The run finished, but some images failed: rejected (recorded) or left for a rerun."""
EXIT_USAGE = 2
"""Bad arguments or input: a flag, the folder, the output, or a request the server refuses
for every image (unknown model, wrong API key, a parameter out of range)."""
EXIT_UNREACHABLE = 3
"""The server cannot be reached, or was lost during the run (what is done is kept)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C or SIGTERM (128 + SIGINT, as shells report it); what is done is kept."""


class Fatal(Exception):
    """A failure of the whole run, shown as one line; the process exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
