"""The attention layer: writes this step's K/V into its paged cache by slot, then calls a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tidellm.model_executor.forward_context import get_forward_context
from tidellm.model_executor.kernels import cpu as cpu_kernels
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
    if (
        k.device.type == "cpu"
        and k.dtype == v.dtype == kv_cache.dtype
        and k.dtype in (torch.float32, torch.bfloat16)
        and k.stride(2) == v.stride(2) == 1
        and k.stride(1) == v.stride(1) == k.shape[2]
        and kv_cache.is_contiguous()
        and slot_mapping.is_contiguous()
        and cpu_kernels.available()
    ):
        cpu_kernels.kv_write(k, v, kv_cache, slot_mapping)  # one call instead of two index_copy_
        return
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class Attention(nn.Module):
    """Multi-head / grouped-query attention over layer ``layer_idx``'s paged KV cache.

    The KV caches and the step's metadata come from the forward context, so the model's ``forward`` keeps
    the Hugging Face shape ``forward(input_ids, positions)``. With ``sliding_window`` W a query at position
    p attends only to keys at positions > p - W (transformers' Mistral / Gemma 3 convention), and reads no
    block older than that."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        layer_idx: int,
        scale: float | None = None,
        backend: AttentionBackend = paged_sdpa_attention,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None (got {sliding_window})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.backend = backend
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        ctx = get_forward_context()
        kv_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.metadata_for(self.layer_idx)
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        return self.backend(q, k, v, kv_cache, meta.for_window(self.sliding_window), self.scale)

    def extra_repr(self) -> str:
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"layer={self.layer_idx}{window}"
        )


def layer_windows(model: nn.Module) -> list[int | None]:
    """The sliding window of each attention layer of ``model`` by layer index (None: full context), read
    from the built model so the KV-cache groups always agree with its layers."""
    windows = {m.layer_idx: m.sliding_window for m in model.modules() if isinstance(m, Attention)}
    if sorted(windows) != list(range(len(windows))):
        raise ValueError(f"attention layer indices must be 0..n-1 (got {sorted(windows)})")
    return [windows[i] for i in range(len(windows))]
