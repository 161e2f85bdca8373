"""Bidirectional attention for encoders: each request's whole prompt in one forward, no KV cache.

The step's tokens arrive packed ([T] rows, request after request), so every linear layer runs on real tokens
only. Attention alone goes through a padded view [B, max_len]: q/k/v rows are scattered into it, one SDPA
call runs with a key mask that hides each request's padding, and the rows are gathered back. A batch of one
request (or of requests of equal length) needs no mask, and a batch of one no scatter either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class EncoderMetadata:
    """Where each request sits in the packed batch; built once per step, read by every layer and the pooler."""

    seq_lens: torch.Tensor  # [B] int64
    query_start_loc: torch.Tensor  # [B + 1] int64
    seq_idx: torch.Tensor  # [T] int64: the request of each packed row
    max_len: int
    # [T] int64: the row of each packed token in the padded [B * max_len] layout; None when B == 1.
    padded_idx: torch.Tensor | None
    # [B, 1, 1, max_len] bool, True at real keys; None when every request is max_len long.
    key_mask: torch.Tensor | None

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(cls, seq_lens: Sequence[int], device: torch.device) -> EncoderMetadata:
        lens = np.asarray(seq_lens, dtype=np.int64)
        if lens.size == 0 or lens.min() < 1:
            raise ValueError(f"every request needs at least one token (got lengths {lens.tolist()})")
        n, total, max_len = lens.size, int(lens.sum()), int(lens.max())
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=qsl[1:])
        seq_idx = np.repeat(np.arange(n), lens)
        padded_idx = key_mask = None
        if n > 1:
            # token j of request b -> b * max_len + (j - start_b)
            padded = seq_idx * max_len + np.arange(total) - qsl[:-1][seq_idx]
            padded_idx = torch.from_numpy(padded).to(device)
            if lens.min() != max_len:
                mask = np.arange(max_len)[None, :] < lens[:, None]  # [B, max_len]
                key_mask = torch.from_numpy(mask[:, None, None, :]).to(device)
        return cls(
            seq_lens=torch.from_numpy(lens).to(device),
            query_start_loc=torch.from_numpy(qsl).to(device),
            seq_idx=torch.from_numpy(seq_idx).to(device),
            max_len=max_len,
            padded_idx=padded_idx,
            key_mask=key_mask,
        )


def encoder_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, H, D]
    v: torch.Tensor,  # [T, H, D]
    meta: EncoderMetadata,
    scale: float,
) -> torch.Tensor:
    """Full (non-causal) attention within each request -> [T, H * D]."""
    num_tokens, num_heads, head_dim = q.shape
    if meta.padded_idx is None:  # one request: no padding at all
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
        )  # [H, T, D]
        return o.transpose(0, 1).reshape(num_tokens, num_heads * head_dim)
    b, length = meta.num_reqs, meta.max_len

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, L, D]
        out = x.new_zeros(b * length, num_heads, head_dim).index_copy_(0, meta.padded_idx, x)
        return out.view(b, length, num_heads, head_dim).transpose(1, 2)

    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=meta.key_mask, scale=scale)
    o = o.transpose(1, 2).reshape(b * length, num_heads * head_dim)  # [B * L, H D]
    return o.index_select(0, meta.padded_idx)  # [T, H D]
