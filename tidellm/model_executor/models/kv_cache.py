"""The paged KV cache tensors, ``[2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]`` each: one per
layer, or one per slot when KV-cache groups share them (``core/kv_cache/groups.py``)."""

from __future__ import annotations

import math
import mmap

import torch

from tidellm.config.arch import ArchConfig


def kv_cache_shape(arch: ArchConfig, num_blocks: int, block_size: int) -> tuple[int, int, int, int, int]:
    return (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)


def kv_cache_bytes_per_block(
    arch: ArchConfig, block_size: int, dtype: torch.dtype, num_tensors: int | None = None
) -> int:
    """Bytes one block id takes across the cache tensors (K and V): one per layer unless ``num_tensors``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * arch.num_key_value_heads * arch.head_dim * itemsize
    return per_layer * (arch.num_hidden_layers if num_tensors is None else num_tensors)


def allocate_kv_caches(
    arch: ArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    layer_slots: list[int] | None = None,
) -> list[torch.Tensor]:
    """Zero-filled so that padding slots a decode batch reads (and masks out) never hold NaN garbage.

    On CPU each layer's cache is a fresh anonymous mapping: the kernel hands out its pages already zeroed,
    on first touch, so start-up does not write gigabytes of zeros (4 GiB took 2-5 s) and the resident size
    grows with the tokens actually cached.

    Returns one tensor per layer; with ``layer_slots`` (the tensor of each layer) layers share tensors."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"need num_blocks >= 1 and block_size >= 1 (got {num_blocks}, {block_size})")
    slots = list(range(arch.num_hidden_layers)) if layer_slots is None else layer_slots
    shape = kv_cache_shape(arch, num_blocks, block_size)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    tensors = [
        torch.zeros(shape, dtype=dtype, device=device)
        if device.type != "cpu"
        else _zeroed_cpu_tensor(shape, dtype, nbytes)
        for _ in range(max(slots) + 1)
    ]
    return [tensors[s] for s in slots]


def _zeroed_cpu_tensor(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    # Anonymous (zero-filled by the OS) and shared, so it keeps 4 KiB pages: transparent huge pages do not
    # apply to shared mappings while shmem THP is off (the default). Measured with a private mapping and
    # huge pages: at 64 streams each step's first touches cost 3x more (2 MiB zeroed at a time) and decode
    # attention was no faster.
    buf = mmap.mmap(-1, nbytes)  # the tensor keeps it alive
    return torch.frombuffer(buf, dtype=dtype).view(shape)
