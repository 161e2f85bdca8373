"""Per-request block tables on top of the block pool, with prefix-cache lookups.

A model's layers form KV-cache groups (``core/kv_cache/groups.py``): one group when every layer attends the
same way, several when sliding-window and full-attention layers are mixed (Gemma 3). A request has one block
table per group, all drawn from the one pool.

A sliding-window group (its layers attend only to the last ``window`` positions) hands back the blocks that
fell entirely behind the window of the request's next query while the request runs. Their ids stay in the
request's block table as placeholders, so positions keep mapping to table columns; the attention layers never
read them (``AttentionMetadata.for_window``). A released block keeps its hash, so it stays hittable until it
is handed out again. A prefix hit needs, in each full group, every block of the prefix, and in each sliding
group only the blocks the first query after the prefix can read.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidellm.core.kv_cache.block_pool import BlockPool, KVBlock
from tidellm.core.kv_cache.hashing import BlockHash
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
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        if not group_windows:
            raise ValueError("need at least one KV-cache group")
        for w in group_windows:
            if w is not None and w < 1:
                raise ValueError(f"sliding windows must be >= 1 or None (got {w})")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.windows = tuple(group_windows)
        self.pool = BlockPool(num_blocks, enable_caching)
        # Stands in for blocks before a sliding window that a prefix hit did not need: never read or freed.
        self._placeholder = KVBlock(0)
        # Per request, per group: the block table, how many leading blocks are registered in the hash map,
        # and how many leading blocks it no longer holds (behind its sliding window).
        self.req_to_blocks: dict[str, list[list[KVBlock]]] = {}
        self._num_cached_blocks: dict[str, list[int]] = {}
        self._num_released: dict[str, list[int]] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, request_id: str) -> list[list[int]]:
        """The request's block table of each group, by position (released blocks included, as placeholders)."""
        tables = self.req_to_blocks.get(request_id)
        if tables is None:
            return [[] for _ in self.windows]
        return [[b.block_id for b in blocks] for blocks in tables]

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds a reference on, over all groups."""
        tables = self.req_to_blocks.get(request_id)
        if tables is None:
            return 0
        return sum(len(t) for t in tables) - sum(self._num_released[request_id])

    def _key(self, group: int, block_hash: BlockHash) -> BlockHash:
        """The hash a group's block is cached under: groups hold different layers of the same tokens."""
        return block_hash if group == 0 else block_hash + bytes((group,))

    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVBlock]], int]:
        """Longest cached prefix of full blocks that every group can use, capped so the last token is always
        computed: (per group, the hit blocks by position, placeholders before a sliding window; tokens)."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            return [[] for _ in self.windows], 0
        hashes = request.block_hashes[: (request.num_tokens - 1) // self.block_size]
        found: list[list[KVBlock | None]] = [[] for _ in self.windows]
        limit = len(hashes)
        for g, window in enumerate(self.windows):  # full groups: an unbroken prefix
            if window is None:
                for h in hashes[:limit]:
                    block = self.pool.get_cached_block(self._key(g, h))
                    if block is None:
                        break
                    found[g].append(block)
                limit = len(found[g])
        for g, window in enumerate(self.windows):  # sliding groups: whatever is there, gaps allowed
            if window is not None:
                found[g] = [self.pool.get_cached_block(self._key(g, h)) for h in hashes[:limit]]
        num_hit = limit
        while num_hit and not self._windows_cached(found, num_hit):
            num_hit -= 1
        if not num_hit:
            return [[] for _ in self.windows], 0
        hits: list[list[KVBlock]] = []
        for g, window in enumerate(self.windows):
            skip = self._first_needed_block(window, num_hit * self.block_size)
            hits.append([self._placeholder] * skip + found[g][skip:num_hit])  # type: ignore[list-item]
        return hits, num_hit * self.block_size

    def _windows_cached(self, found: list[list[KVBlock | None]], num_blocks: int) -> bool:
        """Whether every sliding group has cached the blocks the query after ``num_blocks`` blocks reads."""
        for g, window in enumerate(self.windows):
            if window is not None:
                first = self._first_needed_block(window, num_blocks * self.block_size)
                if any(b is None for b in found[g][first:num_blocks]):
                    return False
        return True

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
        new_computed_blocks: list[list[KVBlock]] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[list[KVBlock]] | None:
        """Make room for ``num_new_tokens`` more tokens in every group: the new blocks of each group, or
        ``None`` (and no change) if blocks run out.

        ``new_computed_blocks`` are prefix-cache hits (per group) for a request that is being scheduled for
        the first time (or resumed); they are attached before the new blocks. In a sliding group, blocks
        wholly behind the window of this step's first query are released (hits there are never taken)."""
        rid = request.request_id
        tables = self.req_to_blocks.get(rid)
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        total = num_computed + num_new_tokens
        num_required = -(-total // self.block_size)
        hits = new_computed_blocks or [[] for _ in self.windows]
        num_new: list[int] = []
        taken: list[list[KVBlock]] = []
        skipped: list[int] = []
        num_touched_free = 0
        for g, window in enumerate(self.windows):
            held = len(tables[g]) if tables is not None else 0
            num_new.append(max(0, num_required - held - len(hits[g])))
            # Hits only come for a request without blocks; those before the window are not needed.
            skip = min(len(hits[g]), self._first_needed_block(window, num_computed)) if not held else 0
            skipped.append(skip)
            taken.append(hits[g][skip:])
            # Hits sitting in the free list stop being free once touched.
            num_touched_free += sum(1 for b in taken[g] if b.ref_cnt == 0)
        if sum(num_new) + num_touched_free > self.pool.num_free_blocks:
            return None

        if tables is None:
            tables = self.req_to_blocks[rid] = [[] for _ in self.windows]
            self._num_cached_blocks[rid] = [0] * self.num_groups
            self._num_released[rid] = [0] * self.num_groups
        new_blocks: list[list[KVBlock]] = []
        for g in range(self.num_groups):
            self.pool.touch(taken[g])
            fresh = self.pool.get_new_blocks(num_new[g])
            tables[g].extend(hits[g])
            tables[g].extend(fresh)
            new_blocks.append(fresh)
            self._num_cached_blocks[rid][g] += len(hits[g])
            if skipped[g]:
                self._num_released[rid][g] = skipped[g]
        self._cache_full_blocks(request, total)
        self._release_out_of_window(rid, num_computed)
        return new_blocks

    def _first_needed_block(self, window: int | None, num_computed: int) -> int:
        """Index of the first block the query at position ``num_computed`` (and every later one) reads."""
        if window is None:
            return 0
        return max(0, num_computed - window + 1) // self.block_size

    def _release_out_of_window(self, rid: str, num_computed: int) -> None:
        for g, window in enumerate(self.windows):
            released = self._num_released[rid][g]
            first_needed = self._first_needed_block(window, num_computed)
            if first_needed > released:
                # Oldest first: they join the free list tail in position order, the oldest evicted first.
                self.pool.free_blocks(self.req_to_blocks[rid][g][released:first_needed])
                self._num_released[rid][g] = first_needed

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that become full once ``num_tokens`` tokens are computed."""
        if not self.enable_caching:
            return
        rid = request.request_id
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        for g in range(self.num_groups):
            start = self._num_cached_blocks[rid][g]
            blocks = self.req_to_blocks[rid][g]
            for i in range(start, end):
                self.pool.cache_block(blocks[i], self._key(g, request.block_hashes[i]))
            self._num_cached_blocks[rid][g] = max(start, end)

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so shared prefixes are evicted last."""
        tables = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        released = self._num_released.pop(request.request_id, None)
        if tables is None or released is None:
            return
        for g, blocks in enumerate(tables):
            self.pool.free_blocks(list(reversed(blocks[released[g] :])))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
