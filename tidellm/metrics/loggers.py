"""A periodic one-line summary of the engine's load, for people reading the server log."""

from __future__ import annotations

import logging
import time

from tidellm.engine.protocol import SchedulerStats
from tidellm.metrics.stats import IterationStats

logger = logging.getLogger(__name__)


class LoggingStatLogger:
    """Logs throughput, batch and KV-cache usage every ``interval`` seconds while there is activity."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._gen_tokens = 0
        self._stats: SchedulerStats | None = None
        self._last_prefix = (0, 0)
        self._active = False

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        if scheduler_stats is not None:
            self._stats = scheduler_stats
        self._prompt_tokens += iteration.num_prompt_tokens
        self._gen_tokens += iteration.num_generation_tokens
        self._active = self._active or bool(iteration.num_generation_tokens or iteration.finished)

    def log(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.interval or not self._active or self._stats is None:
            return
        s = self._stats
        queries = s.prefix_cache_queries - self._last_prefix[0]
        hits = s.prefix_cache_hits - self._last_prefix[1]
        logger.info(
            "Prompt %.1f tok/s, generation %.1f tok/s | running %d, waiting %d | KV cache %.1f%% | prefix-cache hits %.1f%%",
            self._prompt_tokens / elapsed,
            self._gen_tokens / elapsed,
            s.num_running,
            s.num_waiting,
            100.0 * s.kv_cache_usage,
            100.0 * hits / queries if queries else 0.0,
        )
        self._last_prefix = (s.prefix_cache_queries, s.prefix_cache_hits)
        self._prompt_tokens = self._gen_tokens = 0
        self._last_log = now
        self._active = s.num_running > 0 or s.num_waiting > 0
