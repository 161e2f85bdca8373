"""Turn a user prompt and sampling parameters into a validated engine-core request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidellm.engine.protocol import EngineCoreRequest
from tidellm.sample.params import SamplingParams
from tidellm.structured_output.validate import StructuredOutputValidator
from tidellm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tidellm.engine.output_processor import OutputKind, OutputProcessor

PromptType = str | Sequence[int]


class PromptTooLongError(ValueError):
    """Prompt (or prompt + max_tokens) exceeds the context; carries the numbers for HTTP errors."""

    def __init__(self, message: str, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class InputProcessor:
    def __init__(
        self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int, max_logprobs: int = 20
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.structured_outputs = StructuredOutputValidator()

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        ids = list(prompt)
        if not all(isinstance(t, int) for t in ids):
            raise ValueError("prompt token ids must be a list of integers.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size}).")
        return None, ids

    def process(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        strict_length: bool = False,
    ) -> EngineCoreRequest:
        """Validate lengths and resolve ``max_tokens``.

        With ``strict_length`` (the HTTP server, like OpenAI), prompt + max_tokens over the context is an
        error; offline, max_tokens is clipped so the request ends with finish_reason "length".
        """
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("The prompt is empty; pass at least one token.")
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"The prompt has {n} tokens but this model's context (max_model_len) is {self.max_model_len} "
                "tokens and at least one must be left to generate; shorten the prompt.",
                n,
                self.max_model_len,
            )
        room = self.max_model_len - n
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if strict_length and max_tokens > room:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). Reduce the prompt "
                "or max_tokens.",
                n,
                self.max_model_len,
            )
        params.verify(self.vocab_size, self.max_logprobs)
        if params.structured_outputs is not None:
            self.structured_outputs.validate(params.structured_outputs)  # bad schema/regex/grammar: 400 now
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            max_tokens=min(max_tokens, room),
            eos_token_ids=list(self.tokenizer.eos_token_ids),
            arrival_time=arrival_time or time.time(),
            priority=priority,
        )


def register_request(
    input_processor: InputProcessor,
    output_processor: OutputProcessor,
    request_id: str,
    prompt: PromptType,
    params: SamplingParams,
    *,
    kind: OutputKind,
    priority: int = 0,
    arrival_time: float | None = None,
    strict_length: bool = False,
    add_special_tokens: bool = True,
) -> list[EngineCoreRequest]:
    """Tokenize, validate, fan ``n > 1`` out into children and register them with the output processor.

    Shared by the in-process ``LLMEngine`` and the API server's ``AsyncLLM``, so both front ends accept and
    reject exactly the same requests. Validation runs before anything is registered: on an error nothing
    is left behind. Returns the engine-core requests to send (one per child).
    """
    if request_id in output_processor.parents:
        raise ValueError(f"request id {request_id!r} is already in use.")
    text, ids = input_processor.tokenize(prompt, add_special_tokens=add_special_tokens)
    arrival_time = arrival_time or time.time()
    children = params.child_params() if params.n > 1 else [params]
    core_reqs = [
        input_processor.process(
            request_id, ids, p, arrival_time=arrival_time, priority=priority, strict_length=strict_length
        )
        for p in children
    ]
    child_ids = output_processor.add_request(request_id, text, ids, children, kind, arrival_time)
    for cid, req in zip(child_ids, core_reqs, strict=True):
        req.request_id = cid
    return core_reqs
