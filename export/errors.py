"""The one exception type the export stage raises for problems a user can fix."""

from __future__ import annotations


class ExportError(Exception):
    """A user-fixable export failure; ``python -m export`` prints it as a one-line reason."""
