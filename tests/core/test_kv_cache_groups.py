"""KV-cache groups: how layers of mixed attention kinds share block tables and cache tensors."""

import pytest

from tidellm.core.kv_cache.groups import KVCacheGroups


def test_one_kind_is_one_group_of_every_layer():
    g = KVCacheGroups.from_layer_windows([None] * 3)
    assert (g.windows, g.layers, g.num_slots) == ((None,), ((0, 1, 2),), 3)
    assert g.layer_slot() == [0, 1, 2] and g.layer_group() == [0, 0, 0] and g.describe() == ""
    w = KVCacheGroups.from_layer_windows([8, 8])
    assert (w.windows, w.num_slots) == ((8,), 2) and w.describe() == "sliding window 8 on every layer"


def test_gemma3_270m_layout():
    """18 layers, every 6th global: one group of the 3 global layers, five of 3 local layers, 3 tensors."""
    windows = [None if i % 6 == 5 else 512 for i in range(18)]
    g = KVCacheGroups.from_layer_windows(windows)
    assert g.num_slots == 3 and g.windows == (None, *[512] * 5)
    assert g.layers[0] == (5, 11, 17) and g.layers[1] == (0, 1, 2) and g.layers[5] == (14, 15, 16)
    slots, groups = g.layer_slot(), g.layer_group()
    assert [slots[i] for i in (5, 11, 17)] == [0, 1, 2] and groups[5] == groups[17] == 0
    # Every (group, slot) pair is one layer: no two layers write the same cache rows.
    assert len({(groups[i], slots[i]) for i in range(18)}) == 18
    assert g.describe() == "6 groups of 3 layers (1 full, 5 window-512)"
    # A 4096-token sequence: 256 blocks in the global group, 33 in each local group (window + one block).
    assert g.blocks_for_tokens(4096, 16) == 256 + 5 * 33
    # While a 512-token chunk is prefilled a local group holds the window and the chunk.
    assert g.blocks_for_tokens(4096, 16, chunk_tokens=512) == 256 + 5 * 65
    assert g.blocks_for_tokens(100, 16) == 6 * 7  # shorter than the window: every group holds it all


def test_uneven_kinds_pad_the_last_group():
    """Gemma 3 1B: 26 layers, 4 global, 22 local → local groups of 4, the last one 2 layers long."""
    g = KVCacheGroups.from_layer_windows([None if i % 6 == 5 else 512 for i in range(26)])
    assert g.num_slots == 4 and g.num_groups == 1 + 6 and [len(x) for x in g.layers] == [4, 4, 4, 4, 4, 4, 2]
    assert sorted(i for x in g.layers for i in x) == list(range(26))


def test_no_layers_refused():
    with pytest.raises(ValueError, match="at least one attention layer"):
        KVCacheGroups.from_layer_windows([])
