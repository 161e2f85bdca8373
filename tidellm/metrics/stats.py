"""Plain-data statistics the front end gathers per engine step; stat loggers turn them into metrics and logs.

Kept free of Prometheus so the same numbers can feed a periodic log line, a test, or another exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tidellm.engine.protocol import SchedulerStats


@dataclass
class FinishedRequestStats:
    """One user request at its end (``n`` completions count as one request)."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    time_per_output_token: float | None = None


@dataclass
class IterationStats:
    """What changed in the front end while handling one batch of engine outputs (or an abort)."""

    num_prompt_tokens: int = 0  # prompts whose first token arrived in this batch
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        """Called from the event loop after each engine step's outputs are processed."""
        ...

    def log(self) -> None:
        """Called periodically; may do nothing."""
        ...
