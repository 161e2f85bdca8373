"""The CPU KV cache reads as zeros and is committed only as it is written."""

from __future__ import annotations

import os

import torch

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.models.kv_cache import allocate_kv_caches, kv_cache_shape


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_cpu_kv_cache_is_zero_and_lazy():
    arch = ArchConfig(
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
    )
    before = _rss_bytes()
    caches = allocate_kv_caches(
        arch, num_blocks=4096, block_size=16, dtype=torch.float32, device=torch.device("cpu")
    )
    # 2 layers x 64 MiB allocated, nothing touched yet.
    assert len(caches) == 2 and caches[0].shape == kv_cache_shape(arch, 4096, 16)
    assert _rss_bytes() - before < 32 * 2**20
    caches[1][0, 7, 3] = 1.0  # writes stay in their own tensor and are readable back
    assert caches[1][0, 7, 3].eq(1.0).all() and caches[0].count_nonzero() == 0
    assert caches[1].count_nonzero() == 2 * 64
