"""Front-end side of embedding requests: tokenize, truncate and validate in; embeddings out.

Shared by the offline ``LLMEngine`` and the API server's ``AsyncLLM`` (as ``input_processor`` and
``output_processor`` are for generation), so both accept and reject the same inputs with the same messages.
An embedding request is never fanned out and has exactly one output, its embedding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tidellm.engine.input_processor import InputProcessor, PromptTooLongError, PromptType
from tidellm.engine.protocol import EngineCoreOutput, EngineCoreRequest
from tidellm.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics
from tidellm.pooling_params import PoolingParams


def pooling_prompt_ids(
    input_processor: InputProcessor,
    prompt: PromptType,
    params: PoolingParams,
    *,
    embedding_size: int,
    add_special_tokens: bool = True,
) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one embedding prompt, truncated if asked; ValueError on bad input."""
    max_len = input_processor.max_model_len
    if params.dimensions is not None and params.dimensions != embedding_size:
        raise ValueError(
            f"dimensions must be {embedding_size}, this model's embedding size (got {params.dimensions}); "
            "reducing the size of embeddings is not supported."
        )
    keep = params.truncate_prompt_tokens
    if keep == -1:
        keep = max_len
    if keep is not None and keep > max_len:
        raise ValueError(
            f"truncate_prompt_tokens must be at most max_model_len={max_len} (got {keep}); pass a smaller value "
            "or -1 for max_model_len."
        )
    text, ids = input_processor.tokenize(prompt, add_special_tokens=add_special_tokens)
    if keep is not None and len(ids) > keep:
        tok = input_processor.tokenizer
        # A text prompt keeps the closing special token the tokenizer appended (BERT's [SEP]), as
        # Hugging Face truncation does; token ids given by the caller are cut as they are.
        closing = int(
            text is not None and add_special_tokens and tok.add_eos_token and tok.eos_token_id is not None
        )
        closing = min(closing, keep - 1)
        ids = ids[: keep - closing] + (ids[len(ids) - closing :] if closing else [])
    if not ids:
        raise ValueError("The prompt is empty; pass at least one token.")
    if len(ids) > max_len:
        raise PromptTooLongError(
            f"The input has {len(ids)} tokens but this model's maximum input length (max_model_len) is {max_len} "
            "tokens; shorten it, or pass truncate_prompt_tokens to keep only its first tokens.",
            len(ids),
            max_len,
        )
    return text, ids


@dataclass
class PoolingRequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics


class PoolingOutputProcessor:
    """Tracks embedding requests of the front end and turns core outputs into ``EmbeddingRequestOutput``s.

    Same surface as ``OutputProcessor`` (``parents``, ``child_ids``, ``abort``, ``has_unfinished``,
    ``process_outputs``) so the engine front ends drive either one alike."""

    def __init__(self) -> None:
        self.parents: dict[str, PoolingRequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        arrival_time: float | None = None,
    ) -> None:
        metrics = RequestMetrics(arrival_time or time.time())
        self.parents[request_id] = PoolingRequestState(request_id, prompt, prompt_token_ids, metrics)

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def child_ids(self, request_id: str) -> list[str]:
        return [request_id] if request_id in self.parents else []

    def abort(self, request_id: str) -> None:
        self.parents.pop(request_id, None)

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[EmbeddingRequestOutput], list[str]]:
        """Returns the finished embeddings (and, for the generation processor's signature, no ids to abort).

        A request the core refused arrives as ``finish_reason="abort"`` without an embedding: it is dropped
        here, and the front end that tracks it reports the failure."""
        now = time.time()
        results = []
        for out in outputs:
            state = self.parents.pop(out.request_id, None)
            if state is None or out.pooled is None:
                continue
            m = state.metrics
            m.first_token_time = m.last_token_time = m.finished_time = now
            results.append(
                EmbeddingRequestOutput(
                    request_id=state.request_id,
                    prompt=state.prompt,
                    prompt_token_ids=state.prompt_token_ids,
                    outputs=EmbeddingOutput(out.pooled),
                    finished=True,
                    metrics=m,
                )
            )
        return results, []


def register_pooling_request(
    input_processor: InputProcessor,
    output_processor: PoolingOutputProcessor,
    request_id: str,
    prompt: PromptType,
    params: PoolingParams,
    *,
    embedding_size: int,
    priority: int = 0,
    arrival_time: float | None = None,
    add_special_tokens: bool = True,
) -> EngineCoreRequest:
    """Validate and register one embedding request; returns the engine-core request to send. On an error
    nothing is registered."""
    if request_id in output_processor.parents:
        raise ValueError(f"request id {request_id!r} is already in use.")
    text, ids = pooling_prompt_ids(
        input_processor, prompt, params, embedding_size=embedding_size, add_special_tokens=add_special_tokens
    )
    arrival_time = arrival_time or time.time()
    output_processor.add_request(request_id, text, ids, arrival_time)
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling_params=None,
        max_tokens=0,
        arrival_time=arrival_time,
        priority=priority,
        pooling_params=params,
    )
