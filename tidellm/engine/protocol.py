"""Messages between the front end and the engine core: typed msgspec structs (msgpack on the wire).

They are plain data so the same objects serve the in-process engine and the ZMQ engine-core process.
"""

from __future__ import annotations

import msgspec

from tidellm.pooling_params import PoolingParams
from tidellm.sample.params import SamplingParams

# (token ids, logprobs, rank of the sampled/target token): the first id is the sampled one, then the top-N.
LogprobEntry = tuple[list[int], list[float], int]


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for an embedding request (which has pooling_params)
    max_tokens: int
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None
    pooling_params: PoolingParams | None = None


class EngineCoreOutput(msgspec.Struct, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[LogprobEntry] | None = None
    # Sent once, with the first sampled token: entries for prompt positions 1..len-1.
    prompt_logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    scheduled_time: float | None = None  # wall time the request was first scheduled; with its first token
    pooled: list[float] | None = None  # an embedding request's result (its only output)
    # Set when the core could not serve the request (e.g. its grammar failed to compile); the front end
    # raises it as the request's error instead of returning an output.
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_kv_blocks: int = 0


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
