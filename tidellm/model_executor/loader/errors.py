"""The one error type the loader raises for anything a user can fix (paths, formats, downloads)."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be found, fetched or read; the message names the cause and the fix."""
