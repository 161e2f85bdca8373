"""``POST /v1/chat/completions``: render the chat template, generate, answer whole or as SSE deltas."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tidellm.engine.async_llm import RequestStream
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.chat_tools import (
    ToolPlan,
    adapt_for_plain_template,
    plan_tools,
    resolve_tool_format,
    template_tool_calls,
)
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
    FunctionCallOut,
    ToolCallOut,
    UsageInfo,
)
from tidellm.entrypoints.openai.serving_base import SSE_DONE, OpenAIServing, ServerContext, sse, sse_error
from tidellm.entrypoints.openai.structured_outputs import structured_outputs_from_request
from tidellm.entrypoints.openai.tool_parsers import StreamDelta, ToolCallStreamer, ToolParser
from tidellm.outputs import CompletionOutput
from tidellm.sample.params import SamplingParams, StructuredOutputsParams


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
        if m.tool_calls:
            msg["tool_calls"] = template_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
        if m.role == "tool":
            if m.tool_call_id is None:
                raise errors.bad_request(
                    "A tool message needs 'tool_call_id': the id of the call it answers.",
                    param=f"messages[{i}].tool_call_id",
                )
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class OpenAIServingChat(OpenAIServing):
    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        template = ctx.chat_template or self.engine.tokenizer.chat_template
        self.tool_format, self.template_renders_tools, _ = resolve_tool_format(ctx.tool_call_parser, template)

    def render_text(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """``tools`` go to templates that render them; other templates get them (and any tool calls and
        results in ``messages``) written into the messages in the server's tool format."""
        conversation = messages_to_dicts(messages)
        if not self.template_renders_tools and (
            tools or any(m.get("tool_calls") or m["role"] == "tool" for m in conversation)
        ):
            conversation, tools = adapt_for_plain_template(conversation, self.tool_format, tools or []), None
        try:
            return self.engine.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.ctx.chat_template,
                tools=tools or None,
                **(template_kwargs or {}),
            )
        except ValueError as e:  # no template, or the template raised (e.g. roles must alternate)
            raise errors.bad_request(str(e), param="messages") from None

    def render_prompt(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Chat template → token ids. The template carries any bos token, so encoding adds none (as ``LLM.chat``)."""
        text = self.render_text(messages, add_generation_prompt, template_kwargs, tools)
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
        structured, structured_param = structured_outputs_from_request(req)
        plan = plan_tools(req)
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
                structured_outputs=structured,
            )
        except errors.APIError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            elif e.param == "max_tokens":
                e.param = max_tokens_param
            raise
        plan.constrain(params)
        for i, schema in plan.enforced_parameters():  # name the tool whose schema cannot be enforced
            only = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
            await self.check_structured_outputs(only, f"tools[{i}].function.parameters")
        await self.check_structured_outputs(params, structured_param or "tools")
        prompt_ids = self.render_prompt(
            req.messages, req.add_generation_prompt, req.chat_template_kwargs, plan.shown_tools
        )
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
        parser = plan.parser(self.tool_format)
        if req.stream:
            return StreamingResponse(
                self._stream(req, request_id, streams[0], parser, plan), media_type="text/event-stream"
            )
        (final,) = await self.collect_final(streams, raw)
        choices, completion_tokens = [], 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            message, finish_reason = self._message(c, parser, plan)
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=message,
                    logprobs=self._logprobs(req, c.token_ids, c.logprobs),
                    finish_reason=finish_reason,
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

    @staticmethod
    def _message(
        c: CompletionOutput, parser: ToolParser | None, plan: ToolPlan
    ) -> tuple[ChatResponseMessage, str | None]:
        """The reply message and finish reason: ``tool_calls`` when the model called tools and stopped."""
        if parser is None:
            return ChatResponseMessage(content=c.text), c.finish_reason
        extracted = parser.extract(c.text)
        calls = extracted.tool_calls[: plan.max_calls]
        if not calls:
            return ChatResponseMessage(content=extracted.content), c.finish_reason
        tool_calls = [
            ToolCallOut(
                id=new_tool_call_id(),
                type="function",
                function=FunctionCallOut(name=t.name, arguments=t.arguments),
            )
            for t in calls
        ]
        reason = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
        return ChatResponseMessage(content=extracted.content, tool_calls=tool_calls), reason

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int], lps) -> Any:
        if not req.logprobs or lps is None:
            return None
        return chat_logprobs(token_ids, lps, req.top_logprobs or 0, self.engine.tokenizer)

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        stream: RequestStream,
        parser: ToolParser | None = None,
        plan: ToolPlan | None = None,
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
        tool_streams = (
            [_ToolStream(parser, plan.max_calls if plan else None) for _ in range(req.n)] if parser else None
        )
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
                    if tool_streams is not None:
                        lps = self._logprobs(req, c.token_ids, c.logprobs)
                        for choice in tool_streams[c.index].choices(c, lps):
                            yield chunk([choice])
                        continue
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


class _ToolStream:
    """One streamed choice whose text may hold tool calls: text deltas in, OpenAI stream choices out (content,
    then per call a first delta with id, type and name, then argument fragments)."""

    def __init__(self, parser: ToolParser, max_calls: int | None) -> None:
        self.streamer = ToolCallStreamer(parser)
        self.max_calls = max_calls
        self.ids: list[str] = []

    def choices(self, c: CompletionOutput, logprobs: Any) -> list[ChatCompletionStreamChoice]:
        deltas = [self._delta(d) for d in self.streamer.feed(c.text, final=c.finish_reason is not None)]
        deltas = [d for d in deltas if d is not None]
        if not deltas and (c.finish_reason is not None or logprobs is not None):
            deltas = [DeltaMessage()]
        finish = c.finish_reason
        if finish == "stop" and self.ids:
            finish = "tool_calls"
        last = len(deltas) - 1
        return [
            ChatCompletionStreamChoice(
                index=c.index,
                delta=d,
                logprobs=logprobs if k == last else None,
                finish_reason=finish if k == last else None,
                stop_reason=c.stop_reason if k == last else None,
            )
            for k, d in enumerate(deltas)
        ]

    def _delta(self, d: StreamDelta) -> DeltaMessage | None:
        if d.content is not None:
            return DeltaMessage(content=d.content)
        out = []
        for t in d.tool_calls:
            if self.max_calls is not None and t.index >= self.max_calls:
                continue
            if t.name is not None:
                self.ids.append(new_tool_call_id())
                out.append(
                    ToolCallOut(
                        index=t.index,
                        id=self.ids[t.index],
                        type="function",
                        function=FunctionCallOut(name=t.name, arguments=""),
                    )
                )
            else:
                out.append(ToolCallOut(index=t.index, function=FunctionCallOut(arguments=t.arguments)))
        return DeltaMessage(tool_calls=out) if out else None
