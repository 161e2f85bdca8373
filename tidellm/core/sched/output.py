"""What the scheduler hands to the executor each step: ids and ints only, no tensors, no live objects.

New requests arrive in full; requests already known to the runner arrive as diffs (new block ids and
their computed-token count). This keeps the message small and sendable to every worker rank unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidellm.sample.params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    # Prompt tokens, then any output tokens already generated (a request resumed after preemption).
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[list[int]]  # one block table per KV-cache group
    num_computed_tokens: int
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[list[int]]  # per KV-cache group
    num_computed_tokens: int


@dataclass
class GrammarBitmask:
    """Allowed next tokens of the constrained requests that sample this step (structured outputs).

    Row i of ``bitmask`` ([R, ceil(V / 32)] int32, bit j of word w = token 32w + j allowed) belongs to
    ``req_ids[i]``; requests not listed are unconstrained. A NumPy array is plain data too: it pickles and
    sends to every worker rank unchanged."""

    req_ids: list[str]
    bitmask: np.ndarray


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # req_id → tokens to compute this step, in batch order (running first, then new).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests the runner must forget (finished, aborted or preempted since the last step).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    grammar: GrammarBitmask | None = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """Plain lists back from the runner; rows follow ``req_ids``."""

    req_ids: list[str]
    # One list per request: the sampled token, or empty while a prompt is still being prefilled.
    sampled_token_ids: list[list[int]]
    # Per request, when asked: (token ids, logprobs, sampled-token rank) for each sampled position;
    # ids/logprobs hold the sampled token first, then the top-N.
    logprobs: dict[str, tuple[list[int], list[float], int]] = field(default_factory=dict)
    # Per request, once its prompt is done: list over prompt positions 1.. of (ids, logprobs, rank).
    prompt_logprobs: dict[str, list[tuple[list[int], list[float], int]]] = field(default_factory=dict)
