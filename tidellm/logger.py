"""One log format for the whole package."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


def configure_logging(level: str | int = "INFO") -> None:
    """Attach a single stderr handler to the ``tidellm`` logger (idempotent)."""
    root = logging.getLogger("tidellm")
    root.setLevel(level if isinstance(level, int) else level.upper())
    if not any(getattr(h, "_tidellm", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        handler._tidellm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
