"""The scheduler's view of a request: token counters, block hashes, status. Device-free."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from tidellm.core.kv_cache.hashing import BlockHash, hash_block_tokens

if TYPE_CHECKING:
    from tidellm.sample.params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A request inside the engine core.

    The scheduler only reads ``num_tokens`` and ``num_computed_tokens``; the difference is the work left.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        max_tokens: int,
        arrival_time: float | None = None,
        priority: int = 0,
        block_size: int = 16,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_tokens = max_tokens
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.block_size = block_size
        self.cache_salt = cache_salt

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache when the request was first scheduled.
        self.num_cached_tokens = -1
        self.first_scheduled_time: float | None = None  # wall clock, for the queue-time metric
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[BlockHash] = []
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def is_finished(self) -> bool:
        return self.status.finished

    def get_finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
        self.update_block_hashes()

    def update_block_hashes(self) -> None:
        """Extend the chained hashes to every newly full block of known tokens."""
        bs = self.block_size
        n_full = len(self.all_token_ids) // bs
        extra = (self.cache_salt,) if self.cache_salt else None
        for i in range(len(self.block_hashes), n_full):
            parent = self.block_hashes[i - 1] if i else None
            self.block_hashes.append(
                hash_block_tokens(parent, self.all_token_ids[i * bs : (i + 1) * bs], extra)
            )

    def __lt__(self, other: Request) -> bool:
        """Priority order: lower priority value first, then earlier arrival, then id."""
        return (self.priority, self.arrival_time, self.request_id) < (
            other.priority,
            other.arrival_time,
            other.request_id,
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
