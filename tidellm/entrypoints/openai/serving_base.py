"""What every OpenAI endpoint handler shares: model-name checks, sampling parameters, SSE framing,
merging the streams of several prompts, and watching for a client that hangs up."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from tidellm.engine.async_llm import AsyncLLM, RequestStream
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.protocol import OpenAIBaseModel
from tidellm.model_executor.models.tasks import Task, TaskMismatchError
from tidellm.outputs import RequestOutput
from tidellm.sample.params import SamplingParams

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServerContext:
    """State the handlers need, owned by the app (no module globals)."""

    engine: AsyncLLM
    served_model_name: str
    model_root: str
    chat_template: str | None = None
    tool_call_parser: str | None = None  # --tool-call-parser; None = detect from the chat template


class ClientDisconnected(Exception):
    """The HTTP client went away before a non-streaming response was ready."""


class OpenAIServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine

    # ------------------------------------------------------------------ checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.ctx.served_model_name:
            raise errors.model_not_found(model)

    def check_task(self, task: Task) -> None:
        """400 naming the problem when the served model cannot do ``task`` (embed vs generate)."""
        try:
            self.engine.require_task(task)
        except TaskMismatchError as e:
            raise errors.bad_request(str(e), param="model", code="model_not_supported") from None

    @staticmethod
    def warn_ignored(req: OpenAIBaseModel, request_id: str) -> None:
        if req.ignored_fields:
            logger.warning("%s: ignoring unsupported field(s) %s", request_id, ", ".join(req.ignored_fields))

    @staticmethod
    def make_sampling_params(**kwargs: Any) -> SamplingParams:
        """``SamplingParams`` from request fields; a bad value becomes a 400 naming the parameter."""
        try:
            return SamplingParams.from_optional(**kwargs)
        except (ValueError, TypeError) as e:
            raise errors.from_exception(e) from None

    async def check_structured_outputs(self, params: SamplingParams, param: str | None) -> None:
        """A 400 naming ``param`` when the request's schema, regex or grammar cannot be compiled or enforced.
        Checked here, before anything is queued (parsing is cheap and remembered; a thread keeps the first
        use, which imports the grammar library, off the event loop)."""
        if params.structured_outputs is None:
            return
        validator = self.engine.input_processor.structured_outputs
        try:
            await asyncio.to_thread(validator.validate, params.structured_outputs)
        except ValueError as e:
            raise errors.bad_request(str(e), param=param) from None

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ submitting
    async def submit(
        self,
        request_id: str,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        *,
        stream: bool,
        priority: int,
        add_special_tokens: bool = True,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> list[RequestStream]:
        """Submit one engine request per prompt; all or nothing (a later failure aborts the earlier ones)."""
        from tidellm.engine.output_processor import OutputKind

        kind = OutputKind.DELTA if stream else OutputKind.FINAL_ONLY
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(
                    await self.engine.add_request(
                        rid,
                        prompt,
                        params.clone(),
                        kind=kind,
                        priority=priority,
                        add_special_tokens=add_special_tokens,
                    )
                )
        except Exception as e:
            for s in streams:
                self.engine.abort_nowait(s.request_id)
            raise errors.from_exception(e, prompt_param, max_tokens_param) from None
        return streams

    def abort_unfinished(self, streams: Sequence[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.engine.abort_nowait(s.request_id)

    async def collect_final(self, streams: Sequence[RequestStream], raw: Request) -> list[RequestOutput]:
        """Wait for the final output of every stream, aborting all of them if the client disconnects."""

        async def last(s: RequestStream) -> RequestOutput:
            final = None
            async for out in s:
                final = out
            assert final is not None  # a stream always ends with a finished output or raises
            return final

        gathered = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
        watcher = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                try:
                    return gathered.result()
                except Exception as e:
                    raise errors.from_exception(e) from None
            raise ClientDisconnected()
        finally:
            watcher.cancel()
            if not gathered.done():
                gathered.cancel()
            self.abort_unfinished(streams)


async def wait_for_disconnect(raw: Request) -> None:
    """Returns when the client closes the connection (the body has been read already, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(e: Exception) -> str:
    return sse(errors.from_exception(e).body())


_END = object()


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield ``(stream index, output)`` from several streams as outputs arrive (one prompt each)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
