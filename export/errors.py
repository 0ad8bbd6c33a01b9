"""The one exception type the export stage raises for problems a user can fix, and how the
export commands report a failure."""

from __future__ import annotations

import logging
import sys


class ExportError(Exception):
    """A user-fixable export failure; the commands print it as a one-line reason."""


def configure_logging(*, debug: bool) -> None:
    """Our progress lines at INFO; other libraries' loggers (onnxscript) only when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("export").setLevel(logging.DEBUG if debug else logging.INFO)


def failed(exc: Exception) -> int:
    """Print ``exc`` as one ``error:`` line; the exit status: 2 for bad input, 1 otherwise."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, ExportError):
        print(f"error: {type(exc).__name__}: {reason} (--debug shows where)", file=sys.stderr)
        return 1
    print(f"error: {reason}", file=sys.stderr)
    return 2
