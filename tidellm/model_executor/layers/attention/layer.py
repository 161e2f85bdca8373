"""The attention layer: writes this step's K/V into its paged cache by slot, then calls a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tidellm.model_executor.forward_context import get_forward_context
from tidellm.model_executor.layers.attention.metadata import AttentionMetadata
from tidellm.model_executor.layers.attention.sdpa_backend import paged_sdpa_attention

# (q [T,H,D], k [T,Hkv,D], v, kv_cache [2,NB,bs,Hkv,D], metadata, scale) -> [T, H*D]
AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hkv, D] at cache slots slot_mapping [T] of kv_cache [2, NB, bs, Hkv, D]."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class Attention(nn.Module):
    """Multi-head / grouped-query attention over layer ``layer_idx``'s paged KV cache.

    The KV caches and the step's metadata come from the forward context, so the model's ``forward`` keeps
    the Hugging Face shape ``forward(input_ids, positions)``."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        layer_idx: int,
        scale: float | None = None,
        backend: AttentionBackend = paged_sdpa_attention,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        ctx = get_forward_context()
        kv_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn_metadata
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        return self.backend(q, k, v, kv_cache, meta, self.scale)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, layer={self.layer_idx}"
