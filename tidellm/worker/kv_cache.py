"""Sizing the KV cache from a memory budget, and the context length it allows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidellm.config import EngineConfig
from tidellm.config.arch import ArchConfig
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

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        """How many max-length sequences fit at once."""
        return self.capacity_tokens / self.max_model_len

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def allocate(self) -> list[torch.Tensor]:
        return allocate_kv_caches(self.arch, self.num_blocks, self.block_size, self.dtype, self.device)


def plan_kv_cache(
    config: EngineConfig, arch: ArchConfig, dtype: torch.dtype, device: torch.device
) -> KVCachePlan:
    bs = config.cache.block_size
    per_block = kv_cache_bytes_per_block(arch, bs, dtype)
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
    capacity = num_blocks * bs
    max_len = config.model.max_model_len or arch.max_context_len
    if config.model.max_model_len is not None and max_len > arch.max_context_len:
        raise ValueError(
            f"max_model_len={max_len} exceeds the model's context length ({arch.max_context_len}); "
            "lower max_model_len."
        )
    if num_blocks < 1 or capacity < max_len:
        if config.model.max_model_len is None and capacity >= bs:
            # Unset max_model_len: shrink it to what the cache can hold rather than fail.
            max_len = capacity
        else:
            need_gib = -(-max_len // bs) * per_block / 2**30
            raise ValueError(
                f"The KV cache budget ({budget / 2**30:.3f} GiB, {capacity} tokens) cannot hold one sequence of "
                f"max_model_len={max_len} tokens (needs {need_gib:.3f} GiB). Raise kv_cache_memory_gb or "
                "lower max_model_len."
            )
    return KVCachePlan(arch, num_blocks, bs, per_block, max_len, dtype, device)
