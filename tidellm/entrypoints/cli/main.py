"""``tidellm`` console script: serve | generate | chat | bench | models."""

from __future__ import annotations

import argparse
import logging
import sys

from tidellm import __version__


def main(argv: list[str] | None = None) -> int:
    from tidellm.entrypoints.cli import bench, generate, models

    parser = argparse.ArgumentParser(prog="tidellm", description="Fast LLM inference and serving on PyTorch.")
    parser.add_argument("--version", action="version", version=f"tidellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.register(sub)
    bench.register(sub)
    models.register(sub)
    try:
        from tidellm.entrypoints.cli import serve
    except ImportError:  # server extras missing
        serve = None
    if serve is not None:
        serve.register(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        # User errors (bad model path, bad parameter...) get one line, not a traceback.
        logging.getLogger("tidellm").debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
