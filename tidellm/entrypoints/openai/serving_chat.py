"""``POST /v1/chat/completions``: render the chat template, generate, answer whole or as SSE deltas."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tidellm.engine.async_llm import RequestStream
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.logprobs import chat_logprobs
from tidellm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from tidellm.entrypoints.openai.serving_base import SSE_DONE, OpenAIServing, sse, sse_error


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages → the plain dicts chat templates expect (text parts joined; other parts refused)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise errors.bad_request(
                        f"Only text content parts are supported (got type {part.get('type')!r}).",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


class OpenAIServingChat(OpenAIServing):
    def render_text(
        self, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict | None = None
    ) -> str:
        try:
            return self.engine.tokenizer.apply_chat_template(
                messages_to_dicts(messages),
                add_generation_prompt=add_generation_prompt,
                chat_template=self.ctx.chat_template,
                **(template_kwargs or {}),
            )
        except ValueError as e:  # no template, or the template raised (e.g. roles must alternate)
            raise errors.bad_request(str(e), param="messages") from None

    def render_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, template_kwargs: dict | None = None
    ) -> list[int]:
        """Chat template → token ids. The template carries any bos token, so encoding adds none (as ``LLM.chat``)."""
        text = self.render_text(messages, add_generation_prompt, template_kwargs)
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        request_id = self.new_id("chatcmpl")
        self.check_model(req.model)
        self.check_task("generate")
        self.warn_ignored(req, request_id)
        if req.stream_options is not None and not req.stream:
            raise errors.bad_request(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise errors.bad_request(
                "response_format other than 'text' is not supported yet.", param="response_format"
            )
        if req.tools and req.tool_choice != "none":
            raise errors.bad_request("Tool calling is not supported yet.", param="tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise errors.bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise errors.bad_request(
                f"top_logprobs must be an integer in [0, 20] (got {req.top_logprobs}).", param="top_logprobs"
            )
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        try:
            params = self.make_sampling_params(
                **req.sampling_kwargs(),
                max_tokens=max_tokens,
                logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            )
        except errors.APIError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            elif e.param == "max_tokens":
                e.param = max_tokens_param
            raise
        prompt_ids = self.render_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        streams = await self.submit(
            request_id,
            [prompt_ids],
            params,
            stream=req.stream,
            priority=req.priority,
            add_special_tokens=False,
            prompt_param="messages",
            max_tokens_param=max_tokens_param,
        )
        if req.stream:
            return StreamingResponse(
                self._stream(req, request_id, streams[0]), media_type="text/event-stream"
            )
        (final,) = await self.collect_final(streams, raw)
        choices, completion_tokens = [], 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=c.text),
                    logprobs=self._logprobs(req, c.token_ids, c.logprobs),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        p = len(final.prompt_token_ids)
        usage = UsageInfo(
            prompt_tokens=p, completion_tokens=completion_tokens, total_tokens=p + completion_tokens
        )
        resp = ChatCompletionResponse(
            id=request_id, model=self.ctx.served_model_name, choices=choices, usage=usage
        )
        return Response(resp.model_dump_json(), media_type="application/json")

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], lps) -> Any:
        if not req.logprobs or lps is None:
            return None
        return chat_logprobs(token_ids, lps, req.top_logprobs or 0, self.engine.tokenizer)

    async def _stream(
        self, req: ChatCompletionRequest, request_id: str, stream: RequestStream
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.ctx.served_model_name

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=model, choices=choices, usage=usage
                )
            )

        num_tokens = [0] * req.n
        prompt_tokens = 0
        try:
            # OpenAI sends the role first, in its own delta, for every choice.
            yield chunk(
                [
                    ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    for i in range(req.n)
                ]
            )
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids)
                choices = []
                for c in out.outputs:
                    num_tokens[c.index] += len(c.token_ids)
                    if not c.text and c.finish_reason is None and not c.token_ids:
                        continue
                    choices.append(
                        ChatCompletionStreamChoice(
                            index=c.index,
                            delta=DeltaMessage(content=c.text),
                            logprobs=self._logprobs(req, c.token_ids, c.logprobs),
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                if choices:
                    yield chunk(choices)
            if req.stream_options is not None and req.stream_options.include_usage:
                g = sum(num_tokens)
                yield chunk(
                    [],
                    UsageInfo(
                        prompt_tokens=prompt_tokens, completion_tokens=g, total_tokens=prompt_tokens + g
                    ),
                )
        except Exception as e:
            yield sse_error(e)
        finally:
            if not stream.finished:
                self.engine.abort_nowait(stream.request_id)
        yield SSE_DONE
