"""Sizing the KV cache from a memory budget, and the context length it allows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidellm.config import EngineConfig
from tidellm.config.arch import ArchConfig
from tidellm.core.kv_cache.groups import KVCacheGroups
from tidellm.model_executor.models.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from tidellm.platforms import available_memory_bytes

DEFAULT_KV_GIB = 4.0
# When the budget is not given, take at most this share of the memory still available.
DEFAULT_KV_SHARE = 0.25
GPU_KV_SHARE = 0.85


@dataclass
class KVCachePlan:
    arch: ArchConfig
    num_blocks: int
    block_size: int
    bytes_per_block: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    groups: KVCacheGroups | None = None  # None: no KV cache (an embedding model)

    @property
    def max_concurrency(self) -> float:
        """How many max-length sequences fit at once."""
        if self.groups is None or not self.num_blocks:
            return 0.0
        return self.num_blocks / self.groups.blocks_for_tokens(self.max_model_len, self.block_size)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds: of any sequences with one group of full attention, else of max-length
        sequences (sliding-window groups hold only their window of each)."""
        if self.groups is None:
            return 0
        if self.groups.windows == (None,):
            return self.num_blocks * self.block_size
        return int(self.max_concurrency * self.max_model_len)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def allocate(self) -> list[torch.Tensor]:
        """One cache tensor per layer (shared between layers of different groups)."""
        assert self.groups is not None
        return allocate_kv_caches(
            self.arch, self.num_blocks, self.block_size, self.dtype, self.device, self.groups.layer_slot()
        )


def plan_kv_cache(
    config: EngineConfig, arch: ArchConfig, dtype: torch.dtype, device: torch.device, groups: KVCacheGroups
) -> KVCachePlan:
    bs = config.cache.block_size
    per_block = kv_cache_bytes_per_block(arch, bs, dtype, groups.num_slots)
    if config.cache.kv_cache_memory_gb is not None:
        budget = int(config.cache.kv_cache_memory_gb * 2**30)
        if device.type == "cpu" and budget > (free := available_memory_bytes(device)):
            # The CPU cache is committed as it fills (see allocate_kv_caches), so an oversized budget would
            # not fail here but kill the process under load later.
            raise ValueError(
                f"kv_cache_memory_gb={config.cache.kv_cache_memory_gb:g} is more than the memory available "
                f"({free / 2**30:.1f} GiB); lower kv_cache_memory_gb."
            )
    elif device.type == "cuda":
        budget = int(available_memory_bytes(device) * GPU_KV_SHARE)
    else:
        budget = int(min(DEFAULT_KV_GIB * 2**30, available_memory_bytes(device) * DEFAULT_KV_SHARE))
    num_blocks = budget // per_block
    max_len = config.model.max_model_len or arch.max_context_len
    if config.model.max_model_len is not None and max_len > arch.max_context_len:
        raise ValueError(
            f"max_model_len={max_len} exceeds the model's context length ({arch.max_context_len}); "
            "lower max_model_len."
        )
    # Blocks one sequence of max_len needs, its prefill chunks included (a sliding group holds its window
    # plus the chunk being computed).
    chunk = config.scheduler.max_num_batched_tokens
    if num_blocks < groups.blocks_for_tokens(max_len, bs, chunk):
        if config.model.max_model_len is None and num_blocks >= groups.num_groups:
            # Unset max_model_len: shrink it to what the cache can hold rather than fail.
            max_len = _longest_fitting(groups, num_blocks, bs, max_len, chunk)
        else:
            need_gib = groups.blocks_for_tokens(max_len, bs, chunk) * per_block / 2**30
            capacity = num_blocks * bs
            raise ValueError(
                f"The KV cache budget ({budget / 2**30:.3f} GiB, {capacity} tokens) cannot hold one sequence of "
                f"max_model_len={max_len} tokens (needs {need_gib:.3f} GiB). Raise kv_cache_memory_gb or "
                "lower max_model_len."
            )
    return KVCachePlan(arch, num_blocks, bs, per_block, max_len, dtype, device, groups)


def _longest_fitting(groups: KVCacheGroups, num_blocks: int, block_size: int, upper: int, chunk: int) -> int:
    """The longest sequence (a multiple of the block size, below ``upper``) whose blocks fit ``num_blocks``."""
    lo, hi = 1, upper // block_size  # in blocks; one block per group always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if groups.blocks_for_tokens(mid * block_size, block_size, chunk) <= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo * block_size
