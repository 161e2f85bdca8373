"""The OpenAI-compatible HTTP server: FastAPI routes over an ``AsyncLLM``, run by uvicorn.

The engine is started *before* uvicorn (so a model that cannot load fails with one line and no HTTP
server ever appears) and stopped after it. Lifecycle rules:

* SIGTERM / Ctrl-C: stop accepting connections, let requests in flight finish (up to
  ``--shutdown-timeout``), stop the engine process, exit 0.
* Engine process death: requests in flight get an error, new ones 503, ``/health`` 503; a few seconds
  later (so health checks can see it) the server shuts down and exits 1 for a supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tidellm import __version__
from tidellm.config import EngineConfig
from tidellm.config.server import ServerConfig
from tidellm.engine.async_llm import AsyncLLM
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.chat_tools import resolve_tool_format
from tidellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tidellm.entrypoints.openai.serving_base import ClientDisconnected, ServerContext
from tidellm.entrypoints.openai.serving_chat import OpenAIServingChat
from tidellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tidellm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from tidellm.entrypoints.openai.serving_tokenize import OpenAIServingTokenize
from tidellm.logger import configure_logging
from tidellm.metrics.loggers import LoggingStatLogger
from tidellm.metrics.prometheus import CONTENT_TYPE, PrometheusStatLogger

logger = logging.getLogger(__name__)

# After the engine dies, keep answering 503 this long before exiting, so health checks observe the failure.
ENGINE_DEAD_EXIT_DELAY_S = 3.0
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on the API routes (``/health``, ``/metrics`` and
    ``/version`` stay open for probes). Digests are compared in constant time, so neither the key nor its
    length leaks through timing."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"
            and scope["path"].startswith(_PROTECTED_PREFIXES)
        ):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            given = hashlib.sha256(token.strip()).digest()
            if not (hmac.compare_digest(given, self._digest) and scheme.lower() == b"bearer"):
                resp = errors.APIError(
                    401,
                    "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                ).response()
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(ctx: ServerContext, config: ServerConfig, metrics: PrometheusStatLogger) -> FastAPI:
    app = FastAPI(title="tidellm", version=__version__)
    app.state.ctx = ctx
    errors.install_error_handlers(app)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    completion = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)
    tokenize = OpenAIServingTokenize(ctx)
    embedding = OpenAIServingEmbedding(ctx)
    engine = ctx.engine

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        try:
            return await completion.create(req, raw)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        try:
            return await chat.create(req, raw)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.post("/v1/embeddings")
    async def create_embedding(req: EmbeddingRequest, raw: Request) -> Response:
        try:
            return await embedding.create(req, raw)
        except ClientDisconnected:
            return Response(status_code=499)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        card = ModelCard(id=ctx.served_model_name, root=ctx.model_root, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    @app.post("/tokenize")
    async def tokenize_(req: TokenizeRequest) -> TokenizeResponse:
        return tokenize.tokenize(req)

    @app.post("/detokenize")
    async def detokenize_(req: DetokenizeRequest) -> DetokenizeResponse:
        return tokenize.detokenize(req)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return errors.engine_dead(engine.dead_reason).response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics_() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


# ------------------------------------------------------------------------------------------- running
class ServeError(OSError):
    """A start-up problem the user fixes with a flag (port in use, bad host, missing template file)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a port in use fails in a second rather than after the load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ServeError(f"Cannot listen on host {host!r}: {e.strerror}. Check --host.") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(
                f"Port {port} on {host} is already in use; stop the other server or pick another with --port."
            ) from None
        raise ServeError(f"Cannot listen on {host}:{port}: {e.strerror}. Check --host and --port.") from None
    sock.set_inheritable(False)
    return sock


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template`` is a file path, or the template text itself when it contains Jinja markup."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ServeError(
        f"--chat-template: no such file {value!r} (pass a Jinja template file or the template text)."
    )


def process_age() -> float | None:
    """Seconds since this process started (Linux), so start-up time includes interpreter and imports."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22 of stat(5); field 3 is after_name[0]
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Server(uvicorn.Server):
    """uvicorn with our log lines at the two moments users care about: ready, and asked to stop."""

    ready_message: Callable[[], str] | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.ready_message is not None:
            logger.info("%s", self.ready_message())

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            logger.info(
                "Received %s: refusing new connections, letting requests in flight finish (up to %.0f s).",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown or 0,
            )
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def _absorb_signals() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with no-op handlers underneath, that
    re-raise is harmless and we exit 0 after stopping the engine ourselves."""
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _configure_uvicorn_logging(config: ServerConfig) -> None:
    tidellm_handlers = logging.getLogger("tidellm").handlers
    for name, level in (
        ("uvicorn", logging.WARNING),
        ("uvicorn.error", logging.WARNING),
        ("uvicorn.access", logging.INFO),
    ):
        lg = logging.getLogger(name)
        lg.handlers = list(tidellm_handlers)
        lg.setLevel(level)
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = not config.access_log


async def serve(engine_config: EngineConfig, config: ServerConfig, started_at: float | None = None) -> int:
    """Run the server until SIGTERM/Ctrl-C (returns 0) or until the engine dies (returns 1)."""
    t0 = time.perf_counter() if started_at is None else started_at
    configure_logging(config.log_level)
    _configure_uvicorn_logging(config)
    chat_template = load_chat_template(config.chat_template)
    sock = bind_socket(config.host, config.port)
    served_name = config.served_model_name or engine_config.model.model
    metrics = PrometheusStatLogger(served_name)
    try:
        engine = await AsyncLLM.start(
            engine_config,
            stat_loggers=[metrics, LoggingStatLogger()],
            startup_timeout=config.engine_startup_timeout,
            log_level=config.log_level,
        )
    except BaseException:
        sock.close()
        raise
    exit_code = 0
    try:
        ctx = ServerContext(
            engine, served_name, engine_config.model.model, chat_template, config.tool_call_parser
        )
        app = build_app(ctx, config, metrics)
        if engine.task == "generate":
            logger.info(
                "%s",
                resolve_tool_format(ctx.tool_call_parser, chat_template or engine.tokenizer.chat_template)[2],
            )
        uv_config = uvicorn.Config(
            app,
            log_config=None,
            access_log=config.access_log,
            lifespan="off",
            timeout_graceful_shutdown=config.shutdown_timeout,  # type: ignore[arg-type]  (a float works)
            timeout_keep_alive=5,
        )
        server = _Server(uv_config)
        loop = asyncio.get_running_loop()

        def on_engine_dead(reason: str) -> None:
            nonlocal exit_code
            exit_code = 1
            logger.error(
                "Shutting down in %.0f s because the engine died; exit code 1.", ENGINE_DEAD_EXIT_DELAY_S
            )
            loop.call_later(ENGINE_DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

        engine.on_dead(on_engine_dead)
        host, port = sock.getsockname()[:2]
        ready = engine.client.ready
        url_host = f"[{host}]" if ":" in host else host

        def ready_message() -> str:
            age = process_age()
            elapsed = age if age is not None else time.perf_counter() - t0
            cache = (
                f"KV cache {ready.kv_capacity_tokens} tokens" if engine.task == "generate" else "embeddings"
            )
            return (
                f"Serving {served_name!r} at http://{url_host}:{port}/v1 ({ready.dtype}, {cache}, "
                f"max_model_len {ready.max_model_len}"
                f"{', API key required' if config.api_key else ''}); started in {elapsed:.1f} s"
            )

        server.ready_message = ready_message
        with _absorb_signals():
            await server.serve(sockets=[sock])
    finally:
        await engine.shutdown()
        sock.close()
    logger.info("Server stopped (exit code %d).", exit_code)
    return exit_code
