"""Rotary position embedding (neox style, as Hugging Face llama): a cos/sin table built once, indexed by
the step's positions once per forward, and applied to q and k together.

Dimension ``i < D/2`` is rotated with dimension ``i + D/2`` by angle ``position * inv_freq[i]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def compute_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32 after the checkpoint's rope scaling."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponent)
    kind = _rope_type(rope_scaling)
    cfg = rope_scaling or {}
    try:
        if kind == "default":
            return inv_freq
        if kind == "linear":
            # Position interpolation: positions divided by the factor, i.e. every frequency divided by it.
            return inv_freq / float(cfg["factor"])
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, cfg)
    except KeyError as e:
        raise ValueError(
            f"rope_scaling of type {kind!r} lacks the key {e}; rope_scaling={rope_scaling}"
        ) from None
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
        f"rope_scaling={rope_scaling}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by ``factor``, short ones kept, a smooth blend in between."""
    factor = float(cfg["factor"])
    low, high = float(cfg["low_freq_factor"]), float(cfg["high_freq_factor"])
    original_len = float(cfg["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < original_len / high, inv_freq, out)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table [max_positions, D/2] (each) in the model dtype."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        rope_scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim (got {head_dim})")
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, rope_scaling).to(device)  # [D/2] fp32
        t = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # [P, D/2] fp32, cast only after cos/sin as the reference does
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # [P, D]
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D/2], shared by every layer of one forward."""
        cos_sin = self.cos_sin_cache.index_select(0, positions)  # [T, D]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, n, D] (any strides, e.g. q and k as one slice of the qkv output) -> new [T, n, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)  # x2 cos + x1 sin
    return out
