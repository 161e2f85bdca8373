"""KV-cache manager and block pool, checked down to block ids, ref counts and the free-list order."""

import pytest

from tidellm.core.kv_cache.block_pool import BlockPool
from tidellm.core.kv_cache.hashing import hash_block_tokens
from tidellm.core.kv_cache.manager import KVCacheManager
from tidellm.core.request import Request
from tidellm.sample.params import SamplingParams

BS = 4


def make_req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), max_tokens=16, block_size=BS)


def test_hashes_chain_and_are_deterministic():
    a = hash_block_tokens(None, [1, 2, 3, 4])
    b = hash_block_tokens(a, [5, 6, 7, 8])
    assert a == hash_block_tokens(None, [1, 2, 3, 4])
    assert b != hash_block_tokens(None, [5, 6, 7, 8])  # same tokens, different parent
    assert hash_block_tokens(None, [1, 2, 3, 4], ("salt",)) != a
    req = make_req("r", list(range(10)))
    assert req.block_hashes == [
        a := hash_block_tokens(None, [0, 1, 2, 3]),
        hash_block_tokens(a, [4, 5, 6, 7]),
    ]


def test_allocate_cache_free_tail_first_and_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", list(range(20)))
    assert kv.get_computed_blocks(a) == ([[]], 0)
    new = kv.allocate_slots(a, 20)[0]
    assert [b.block_id for b in new] == [0, 1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in new)
    assert len(kv.pool.cached) == 5
    kv.free(a)
    # Unused blocks first, then a's blocks tail first.
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 4, 3, 2, 1, 0]
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)

    # Same prompt: 4 of 5 blocks hit (the last token must be computed), the hits leave the free list.
    b = make_req("b", list(range(20)))
    hits, n_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits[0]] == [0, 1, 2, 3] and n_hit == 16
    new = kv.allocate_slots(b, 4, hits, n_hit)[0]
    assert [x.block_id for x in new] == [5]
    assert kv.get_block_ids("b") == [[0, 1, 2, 3, 5]]
    assert kv.pool.free_block_ids() == [6, 7, 8, 9, 4]
    # Block 5 holds the same tokens as cached block 4: first writer wins, 5 stays unregistered.
    assert kv.pool.blocks[5].block_hash is None and kv.pool.blocks[4].block_hash is not None


def test_shared_prefix_ref_counts():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_req("a", list(range(9)))
    kv.allocate_slots(a, 9)
    b = make_req("b", list(range(8)) + [99, 98])
    hits, n_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits[0]] == [0, 1] and n_hit == 8
    kv.allocate_slots(b, 2, hits, n_hit)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2]


def test_eviction_lru_and_out_of_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    c = make_req("c", [50 + i for i in range(12)])
    assert kv.allocate_slots(c, 17) is None  # 5 blocks > 4 in the pool
    assert kv.get_block_ids("c") == [[]]  # a failed allocation changes nothing
    new = kv.allocate_slots(c, 12)[0]
    # Takes 2, 3 (never cached) then 1 (a's tail block), evicting its hash; block 0 stays cached.
    assert [b.block_id for b in new] == [2, 3, 1]
    assert kv.pool.num_evictions == 1
    hits, n_hit = kv.get_computed_blocks(make_req("a2", list(range(8))))
    assert [h.block_id for h in hits[0]] == [0] and n_hit == 4
    c.num_computed_tokens = 12
    assert [b.block_id for b in kv.allocate_slots(c, 4)[0]] == [
        0
    ]  # one more block: takes block 0, evicting it
    assert kv.pool.num_evictions == 2
    assert kv.get_computed_blocks(make_req("a3", list(range(8)))) == ([[]], 0)


def test_incremental_allocation_caches_blocks_as_they_fill():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    r = make_req("r", [1, 2, 3])
    kv.allocate_slots(r, 3)
    assert len(kv.pool.cached) == 0
    r.num_computed_tokens = 3
    r.append_output_token_ids([4])
    kv.allocate_slots(r, 1)  # token 4 fills block 0
    assert kv.get_block_ids("r") == [[0]] and len(kv.pool.cached) == 1
    r.num_computed_tokens = 4
    r.append_output_token_ids([5])
    kv.allocate_slots(r, 1)
    assert kv.get_block_ids("r") == [[0, 1]]


def test_prompt_logprobs_requests_skip_the_cache_and_disabled_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    kv.allocate_slots(make_req("a", list(range(9))), 9)
    assert kv.get_computed_blocks(make_req("b", list(range(9)), prompt_logprobs=1)) == ([[]], 0)
    off = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    off.allocate_slots(make_req("a", list(range(9))), 9)
    assert off.pool.cached == {}
    assert off.get_computed_blocks(make_req("b", list(range(9)))) == ([[]], 0)


def test_reset_prefix_cache_and_double_free():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.cache_block(blocks[0], b"h")
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() and pool.cached == {}
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks([blocks[0]])


def test_sliding_window_releases_blocks_behind_the_window():
    """window 6, blocks of 4: once the next query is at position p, blocks wholly before p - 5 go back to the
    pool (oldest first); their ids stay in the table as placeholders and their hashes stay hittable."""
    kv = KVCacheManager(num_blocks=10, block_size=BS, group_windows=(6,))
    a = make_req("a", list(range(20)))
    assert [b.block_id for b in kv.allocate_slots(a, 8)[0]] == [0, 1]  # positions 0..7
    a.num_computed_tokens = 8
    assert [b.block_id for b in kv.allocate_slots(a, 8)[0]] == [2, 3]  # query 8 sees 3..8: block 0 still live
    assert kv.num_held_blocks("a") == 4
    a.num_computed_tokens = 16
    assert [b.block_id for b in kv.allocate_slots(a, 4)[0]] == [4]  # query 16 sees 11..16: blocks 0, 1 go
    assert kv.get_block_ids("a") == [[0, 1, 2, 3, 4]] and kv.num_held_blocks("a") == 3
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 0, 1]
    assert [kv.pool.blocks[i].ref_cnt for i in range(5)] == [0, 0, 1, 1, 1]
    assert len(kv.pool.cached) == 5  # released blocks keep their hashes
    kv.free(a)  # only the held ones, tail first
    assert kv.pool.free_block_ids() == [5, 6, 7, 8, 9, 0, 1, 4, 3, 2]
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)

    # The same prompt hits 4 blocks; the query at 16 cannot read blocks 0 and 1: placeholders stand in.
    b = make_req("b", list(range(20)))
    hits, n_hit = kv.get_computed_blocks(b)
    assert hits[0][0] is hits[0][1] is kv._placeholder
    assert [h.block_id for h in hits[0][2:]] == [2, 3] and n_hit == 16
    assert [x.block_id for x in kv.allocate_slots(b, 4, hits, n_hit)[0]] == [5]
    assert kv.get_block_ids("b")[0][2:] == [2, 3, 5] and kv.num_held_blocks("b") == 3
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3, 5)] == [0, 0, 1, 1, 1]
    assert kv.pool.free_block_ids() == [6, 7, 8, 9, 0, 1, 4]
    kv.free(b)
    assert kv.pool.free_block_ids() == [6, 7, 8, 9, 0, 1, 4, 5, 3, 2]


def test_sliding_window_allocation_counts_only_taken_hits():
    """Hits behind the window are neither taken nor counted against the free list (4 free blocks, where
    taking all 4 hits and a new block would need 5), and may then be evicted like any free block."""
    kv = KVCacheManager(num_blocks=6, block_size=BS, group_windows=(4,))
    a = make_req("a", list(range(17)))
    kv.allocate_slots(a, 17)
    kv.free(a)  # blocks 0..3 cached; free list 5, then a's blocks tail first
    blocker = make_req("x", [90 + i for i in range(8)])
    assert [b.block_id for b in kv.allocate_slots(blocker, 8)[0]] == [5, 4]
    b = make_req("b", list(range(16)) + [77])
    hits, n_hit = kv.get_computed_blocks(b)
    # The query at 16 sees 13..16: only block 3 is needed and taken; the new block evicts cached block 2.
    assert hits[0][:3] == [kv._placeholder] * 3 and hits[0][3].block_id == 3 and n_hit == 16
    assert [x.block_id for x in kv.allocate_slots(b, 1, hits, n_hit)[0]] == [2]
    assert kv.get_block_ids("b")[0][3:] == [3, 2] and kv.num_held_blocks("b") == 2
    assert kv.pool.free_block_ids() == [1, 0] and kv.pool.num_evictions == 1
    kv.free(b)
    assert kv.pool.free_block_ids() == [1, 0, 2, 3]
    with pytest.raises(ValueError, match="sliding windows must be >= 1"):
        KVCacheManager(num_blocks=2, block_size=BS, group_windows=(0,))


def test_hybrid_groups_allocate_release_and_hit_separately():
    """A full group and a window-6 group on one pool of 20 blocks of 4 tokens: the sliding group releases
    behind its window while the full group keeps everything; a hit needs the full group's whole prefix and
    the sliding group's last window only, and cached blocks of one group never serve the other."""
    kv = KVCacheManager(num_blocks=20, block_size=BS, group_windows=(None, 6))
    a = make_req("a", list(range(20)))
    new = kv.allocate_slots(a, 16)
    assert [[b.block_id for b in g] for g in new] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a.num_computed_tokens = 16
    kv.allocate_slots(a, 4)  # query 16 sees 11..16: the sliding group's blocks 0, 1 (ids 4, 5) go back
    assert kv.get_block_ids("a") == [[0, 1, 2, 3, 8], [4, 5, 6, 7, 9]]
    assert kv.num_held_blocks("a") == 5 + 3
    assert kv.pool.free_block_ids()[-2:] == [4, 5]
    assert len(kv.pool.cached) == 10  # five full blocks in each group, under different keys
    kv.free(a)

    # Same prompt: 4 blocks hit in the full group; the sliding group needs only blocks 2 and 3.
    b = make_req("b", list(range(20)))
    hits, n_hit = kv.get_computed_blocks(b)
    assert n_hit == 16 and [h.block_id for h in hits[0]] == [0, 1, 2, 3]
    assert hits[1][:2] == [kv._placeholder] * 2 and [h.block_id for h in hits[1][2:]] == [6, 7]
    kv.allocate_slots(b, 4, hits, n_hit)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 3, 4, 5, 6, 7)] == [1, 1, 0, 0, 1, 1]
    kv.free(b)

    # Evict the sliding group's block 3 (id 7): a hit of 4 blocks is no longer usable there, 3 still is
    # (the query at 12 reads 7..12: blocks 1 and 2, ids 5 and 6).
    kv.pool._evict(kv.pool.blocks[7])
    hits, n_hit = kv.get_computed_blocks(make_req("c", list(range(20))))
    assert n_hit == 12 and [h.block_id for h in hits[0]] == [0, 1, 2]
    assert hits[1][0] is kv._placeholder and [h.block_id for h in hits[1][1:]] == [5, 6]


def test_hybrid_allocation_fails_whole_when_any_group_runs_out():
    kv = KVCacheManager(num_blocks=5, block_size=BS, group_windows=(None, 6))
    a = make_req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is None  # 3 blocks per group = 6 > 5
    assert kv.get_block_ids("a") == [[], []] and kv.pool.num_free_blocks == 5
    assert kv.allocate_slots(a, 8) is not None and kv.pool.num_free_blocks == 1
