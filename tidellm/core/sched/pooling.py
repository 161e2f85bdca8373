"""The scheduler of an embedding model: whole prompts, batched by a token budget, no KV cache.

An encoder sees every token of a prompt in one forward and keeps nothing afterwards, so a request is done
the step it is scheduled: there is no chunking, no decode, no preemption and no block accounting. Each step
takes waiting requests in queue order (FCFS or priority) while their tokens fit ``max_num_batched_tokens``
and their count ``max_num_seqs``; a prompt longer than the budget (up to ``max_model_len``) runs alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tidellm.config import SchedulerConfig
from tidellm.core.request import RequestStatus
from tidellm.core.sched.queue import make_queue
from tidellm.engine.protocol import EngineCoreOutput, SchedulerStats


@dataclass(eq=False)
class PoolingRequest:
    """The scheduler's view of an embedding request."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    priority: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def __lt__(self, other: PoolingRequest) -> bool:
        """Priority order: lower priority value first, then earlier arrival, then id."""
        return (self.priority, self.arrival_time, self.request_id) < (
            other.priority,
            other.arrival_time,
            other.request_id,
        )


@dataclass
class PoolingSchedulerOutput:
    """One step's batch: ids and whole prompts (plain data, sendable to every worker rank)."""

    req_ids: list[str]
    prompt_token_ids: list[list[int]]
    finished_req_ids: set[str]

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_token_ids)

    @property
    def is_empty(self) -> bool:
        return not self.req_ids


@dataclass
class PoolingRunnerOutput:
    """Plain lists back from the pooling runner; rows follow ``req_ids``."""

    req_ids: list[str]
    embeddings: list[list[float]]


class PoolingScheduler:
    def __init__(self, config: SchedulerConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.requests: dict[str, PoolingRequest] = {}
        self.waiting = make_queue(config.policy)
        self._scheduled_at: dict[str, float] = {}
        self._finished_ids: set[str] = set()

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: PoolingRequest) -> None:
        if not 0 < request.num_tokens <= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens; an embedding request needs "
                f"1 to max_model_len={self.max_model_len}."
            )
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[PoolingRequest]:
        """Drop waiting requests (aborts); unknown or already finished ids are ignored."""
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.waiting.remove(req)
                self._finished_ids.add(rid)
                done.append(req)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(len(self.waiting))

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> PoolingSchedulerOutput:
        budget = self.config.max_num_batched_tokens
        batch: list[PoolingRequest] = []
        now = time.time()
        while len(self.waiting) and len(batch) < self.config.max_num_seqs:
            req = self.waiting.peek()
            if batch and req.num_tokens > budget:
                break
            self.waiting.pop()
            batch.append(req)
            budget -= req.num_tokens
            self._scheduled_at[req.request_id] = now
        out = PoolingSchedulerOutput(
            req_ids=[r.request_id for r in batch],
            prompt_token_ids=[r.prompt_token_ids for r in batch],
            finished_req_ids=self._finished_ids,
        )
        self._finished_ids = set()
        return out

    # ------------------------------------------------------------------ results
    def update_from_output(
        self, sched_out: PoolingSchedulerOutput, runner_out: PoolingRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs = []
        for rid, embedding in zip(runner_out.req_ids, runner_out.embeddings, strict=True):
            if self.requests.pop(rid, None) is None:
                continue
            outputs.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=[],
                    pooled=embedding,
                    finish_reason="stop",
                    scheduled_time=self._scheduled_at.pop(rid, None),
                )
            )
        return outputs

    # ------------------------------------------------------------------ stats
    def make_stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=0, num_waiting=len(self.waiting))
