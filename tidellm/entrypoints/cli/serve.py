"""`tidellm serve [MODEL]`: the OpenAI-compatible server. Flags come from ``EngineConfig`` and ``ServerConfig``."""

from __future__ import annotations

import argparse
import dataclasses
import time

from tidellm.config.server import ServerConfig
from tidellm.entrypoints.cli.args import add_config_args, add_engine_args, engine_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /tokenize, /detokenize, /health, /metrics). Listens on 127.0.0.1:8000 by default; "
        "pass --host 0.0.0.0 to accept connections from other machines.",
    )
    add_engine_args(p, positional_model=True)
    add_config_args(p.add_argument_group("server options"), ServerConfig)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from tidellm.engine.core_client import EngineStartupError
    from tidellm.entrypoints.openai.api_server import serve

    t0 = time.perf_counter()
    server_config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    engine_config = engine_config_from_args(args)
    try:
        return asyncio.run(serve(engine_config, server_config, started_at=t0))
    except EngineStartupError as e:
        # Already one clean line from the engine's own log, or the reason it gave; no traceback.
        import sys

        print(f"error: the engine could not start: {e}", file=sys.stderr)
        return 1
