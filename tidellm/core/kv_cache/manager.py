"""Per-request block tables on top of the block pool, with prefix-cache lookups.

Sliding-window models (``sliding_window`` set: every attention layer of the model attends only to the last
``sliding_window`` positions) hand back the blocks that fell entirely behind the window of a request's next
query while the request runs. Their ids stay in the request's block table as placeholders, so positions keep
mapping to table columns; the attention layers never read them (``AttentionMetadata.for_window``). A released
block keeps its hash, so it stays hittable until it is handed out again. Models that mix sliding and global
layers keep every block: one block id addresses all layers, and the global layers read everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidellm.core.kv_cache.block_pool import BlockPool, KVBlock
from tidellm.core.request import Request


@dataclass
class PrefixCacheStats:
    """Counters since start-up (tokens, as vLLM reports them)."""

    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache
    requests: int = 0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None (got {sliding_window})")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # How many of a request's leading blocks are already registered in the hash map.
        self._num_cached_blocks: dict[str, int] = {}
        # How many of a request's leading blocks it no longer holds (out of its sliding window).
        self._num_released: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table by position (released blocks included, as placeholders)."""
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds a reference on."""
        return len(self.req_to_blocks.get(request_id, ())) - self._num_released.get(request_id, 0)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks, capped so the last token is always computed."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit, len(hit) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one lookup that led to scheduling (lookups retried while blocked are not counted)."""
        if self.enable_caching:
            self.stats.requests += 1
            self.stats.queries += num_tokens
            self.stats.hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` more tokens; ``None`` (and no change) if blocks run out.

        ``new_computed_blocks`` are prefix-cache hits for a request that is being scheduled for the first
        time (or resumed); they are attached before the new blocks. With a sliding window, blocks wholly
        behind the window of this step's first query are released (hits there are never taken at all).
        """
        computed = new_computed_blocks or []
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        total = num_computed + num_new_tokens
        num_required = -(-total // self.block_size)
        num_new = max(0, num_required - len(blocks) - len(computed))
        # Hits only come for a request without blocks; those before the window are not needed.
        skipped = min(len(computed), self._first_needed_block(num_computed)) if not blocks else 0
        taken = computed[skipped:]
        # Hits sitting in the free list stop being free once touched.
        num_touched_free = sum(1 for b in taken if b.ref_cnt == 0)
        if num_new + num_touched_free > self.pool.num_free_blocks:
            return None

        self.pool.touch(taken)
        new_blocks = self.pool.get_new_blocks(num_new)
        blocks = self.req_to_blocks.setdefault(rid, [])
        blocks.extend(computed)
        blocks.extend(new_blocks)
        if rid not in self._num_cached_blocks:
            self._num_cached_blocks[rid] = 0
        self._num_cached_blocks[rid] += len(computed)
        if skipped:
            self._num_released[rid] = skipped
        self._cache_full_blocks(request, total)
        self._release_out_of_window(rid, num_computed)
        return new_blocks

    def _first_needed_block(self, num_computed: int) -> int:
        """Index of the first block the query at position ``num_computed`` (and every later one) can read."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def _release_out_of_window(self, rid: str, num_computed: int) -> None:
        released = self._num_released.get(rid, 0)
        first_needed = self._first_needed_block(num_computed)
        if first_needed > released:
            # Oldest first: they join the free list tail in position order, the oldest evicted first.
            self.pool.free_blocks(self.req_to_blocks[rid][released:first_needed])
            self._num_released[rid] = first_needed

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that become full once ``num_tokens`` tokens are computed."""
        if not self.enable_caching:
            return
        rid = request.request_id
        start = self._num_cached_blocks[rid]
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        blocks = self.req_to_blocks[rid]
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[rid] = max(start, end)

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so shared prefixes are evicted last."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        released = self._num_released.pop(request.request_id, 0)
        self.pool.free_blocks(list(reversed(blocks[released:])))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
