"""``POST /v1/completions``: one or several prompts (text or token ids), streamed as SSE or returned whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tidellm.engine.async_llm import RequestStream
from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.logprobs import completion_logprobs
from tidellm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from tidellm.entrypoints.openai.serving_base import (
    SSE_DONE,
    OpenAIServing,
    merge_streams,
    sse,
    sse_error,
)
from tidellm.entrypoints.openai.structured_outputs import structured_outputs_from_request
from tidellm.outputs import CompletionOutput, RequestOutput


def normalize_prompts(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's four prompt shapes → a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise errors.bad_request("prompt must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    for i, p in enumerate(prompt):
        if isinstance(p, list) and not p:
            raise errors.bad_request(f"prompt[{i}] is an empty list of token ids.", param="prompt")
    return list(prompt)


@dataclass
class _ChoiceState:
    """Running per-choice values of a stream: offsets for logprobs, token counts for usage."""

    text_offset: int = 0
    num_tokens: int = 0
    echoed: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        request_id = self.new_id("cmpl")
        self.check_model(req.model)
        self.check_task("generate")
        self.warn_ignored(req, request_id)
        if req.suffix:
            raise errors.bad_request("suffix is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise errors.bad_request("best_of is not supported; use n.", param="best_of")
        if req.stream_options is not None and not req.stream:
            raise errors.bad_request(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        prompts = normalize_prompts(req.prompt)
        want_prompt_lps = req.echo and req.logprobs is not None
        structured, structured_param = structured_outputs_from_request(req)
        params = self.make_sampling_params(
            **req.sampling_kwargs(),
            max_tokens=req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if want_prompt_lps else None,
            structured_outputs=structured,
        )
        await self.check_structured_outputs(params, structured_param)
        streams = await self.submit(
            request_id,
            prompts,
            params,
            stream=req.stream,
            priority=req.priority,
            add_special_tokens=req.add_special_tokens,
        )
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, streams), media_type="text/event-stream")
        finals = await self.collect_final(streams, raw)
        return Response(
            self._response(req, request_id, finals).model_dump_json(), media_type="application/json"
        )

    # ------------------------------------------------------------------ helpers
    def _prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)

    def _choice(
        self, req: CompletionRequest, out: RequestOutput, c: CompletionOutput, state: _ChoiceState
    ) -> CompletionChoice:
        text, ids, lps = c.text, list(c.token_ids), c.logprobs
        if req.echo and not state.echoed:
            state.echoed = True
            text = self._prompt_text(out) + text
            if lps is not None:
                ids = list(out.prompt_token_ids) + ids
                lps = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + list(lps)
        logprobs = None
        if req.logprobs is not None and lps is not None:
            logprobs = completion_logprobs(ids, lps, req.logprobs, self.engine.tokenizer, state.text_offset)
            if logprobs.tokens:
                state.text_offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        state.num_tokens += len(c.token_ids)
        return CompletionChoice(
            index=0, text=text, logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason
        )

    def _response(
        self, req: CompletionRequest, request_id: str, finals: list[RequestOutput]
    ) -> CompletionResponse:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            for c in sorted(out.outputs, key=lambda c: c.index):
                state = _ChoiceState()
                choice = self._choice(req, out, c, state)
                choice.index = i * req.n + c.index
                choices.append(choice)
                completion_tokens += state.num_tokens
        usage = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(
            id=request_id, model=self.ctx.served_model_name, choices=choices, usage=usage
        )

    async def _stream(
        self, req: CompletionRequest, request_id: str, streams: list[RequestStream]
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.ctx.served_model_name
        states: dict[int, _ChoiceState] = {}
        prompt_tokens: dict[int, int] = {}
        try:
            async for i, out in merge_streams(streams):
                prompt_tokens[i] = len(out.prompt_token_ids)
                choices = []
                for c in out.outputs:
                    index = i * req.n + c.index
                    choice = self._choice(req, out, c, states.setdefault(index, _ChoiceState()))
                    choice.index = index
                    if choice.text or choice.finish_reason is not None or choice.logprobs is not None:
                        choices.append(choice)
                if choices:
                    chunk = CompletionResponse(id=request_id, created=created, model=model, choices=choices)
                    yield sse(chunk)
            if req.stream_options is not None and req.stream_options.include_usage:
                p = sum(prompt_tokens.values())
                g = sum(s.num_tokens for s in states.values())
                usage = UsageInfo(prompt_tokens=p, completion_tokens=g, total_tokens=p + g)
                yield sse(
                    CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)
                )
        except Exception as e:
            yield sse_error(e)
        finally:
            self.abort_unfinished(streams)
        yield SSE_DONE
