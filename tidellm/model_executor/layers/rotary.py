"""Rotary position embedding (neox style, as Hugging Face llama): a cos/sin table built once, indexed by
the step's positions once per forward, and applied to q and k together.

Dimension ``i < R/2`` is rotated with dimension ``i + R/2`` by angle ``position * inv_freq[i]``, where the
rotary dimension R is the head dimension D, or its first ``partial_rotary_factor`` part (Phi-4-mini); the
other dimensions pass through.

RoPE scaling follows ``transformers.modeling_rope_utils`` (linear, dynamic NTK, YaRN, Llama 3, LongRoPE).
Two of them depend on the length of the sequence in transformers, which recomputes the frequencies for
each forward from ``max(position) + 1``: dynamic NTK (above ``max_position_embeddings``) and LongRoPE
(short factors up to ``original_max_position_embeddings``, long ones above). A paged KV cache keeps keys
rotated once, so here every position has fixed frequencies: row ``p`` of the table uses what transformers
uses for a forward whose last position is ``p``. That equals transformers on any sequence that stays within
the first regime (dynamic NTK: ``max_position_embeddings``; LongRoPE: ``original_max_position_embeddings``)
and equals its token-by-token decoding beyond it; a single transformers forward over a longer sequence
instead re-rotates the early positions with the later frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tidellm.model_executor.kernels import cpu as cpu_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def _base_inv_freq(dim: int, base: float | torch.Tensor) -> torch.Tensor:
    """Unscaled inverse frequencies: [dim/2], or [N, dim/2] for a base per row (an [N, 1] tensor)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (base**exponent)


def compute_inv_freq(
    dim: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies [R/2] in fp32 after the checkpoint's rope scaling, for a forward whose sequence
    is ``seq_len`` long (None: as transformers builds them at load time; only dynamic NTK and LongRoPE
    depend on it). ``dim`` is the rotary dimension R (the head dimension unless ``rotary_dim`` says less);
    ``max_position_embeddings`` is the config's (needed by dynamic NTK, and the fallback of
    ``original_max_position_embeddings``)."""
    kind = _rope_type(rope_scaling)
    cfg = rope_scaling or {}
    try:
        if kind == "default":
            return _base_inv_freq(dim, base)
        if kind == "linear":
            # Position interpolation: positions divided by the factor, i.e. every frequency divided by it.
            return _base_inv_freq(dim, base) / float(cfg["factor"])
        if kind == "llama3":
            return _llama3_inv_freq(_base_inv_freq(dim, base), cfg)
        if kind == "dynamic":
            max_pos = _required(max_position_embeddings, kind)
            return _base_inv_freq(dim, _ntk_base(base, float(cfg["factor"]), seq_len, max_pos, dim))
        if kind == "yarn":
            return _yarn_inv_freq(dim, base, cfg, _required(max_position_embeddings, kind))
        if kind == "longrope":
            return _longrope_inv_freq(dim, base, cfg, max_position_embeddings, seq_len)
    except KeyError as e:
        raise ValueError(
            f"rope_scaling of type {kind!r} lacks the key {e}; rope_scaling={rope_scaling}"
        ) from None
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
        f"rope_scaling={rope_scaling}"
    )


def attention_factor(
    rope_scaling: dict[str, Any] | None, max_position_embeddings: int | None = None
) -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (1.0 for the other types)."""
    kind = _rope_type(rope_scaling)
    cfg = rope_scaling or {}
    if kind not in ("yarn", "longrope"):
        return 1.0
    if cfg.get("attention_factor") is not None:
        return float(cfg["attention_factor"])
    original = _original_len(cfg, max_position_embeddings)
    factor = _scaling_factor(cfg, max_position_embeddings, original)
    if kind == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def position_inv_freq(
    dim: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    num_positions: int,
) -> torch.Tensor:
    """The frequencies each position is rotated with: [P, R/2], or [1, R/2] when all positions share them
    (see the module docstring for the length-dependent types)."""
    kind = _rope_type(rope_scaling)
    cfg = rope_scaling or {}
    first = compute_inv_freq(dim, base, rope_scaling, max_position_embeddings)[None]  # [1, R/2]
    if kind == "dynamic" and num_positions > max_position_embeddings:
        # transformers computes the grown base in fp32 tensors from max(position) + 1: do the same per row.
        seq_lens = torch.arange(max_position_embeddings + 1, num_positions + 1, dtype=torch.int64)[:, None]
        grown = _base_inv_freq(
            dim, _ntk_base(base, float(cfg["factor"]), seq_lens, max_position_embeddings, dim)
        )
        return torch.cat([first.expand(max_position_embeddings, -1), grown])
    if kind == "longrope":
        original = _original_len(cfg, max_position_embeddings)
        if num_positions > original:
            long = compute_inv_freq(dim, base, rope_scaling, max_position_embeddings, seq_len=original + 1)
            return torch.cat([first.expand(original, -1), long[None].expand(num_positions - original, -1)])
    return first


def _required(value: int | None, kind: str) -> int:
    if value is None:
        raise ValueError(f"rope_scaling type {kind!r} needs max_position_embeddings")
    return value


def rotary_dim(head_dim: int, rope_scaling: dict[str, Any] | None) -> int:
    """How many leading dimensions of each head are rotated (``partial_rotary_factor`` of them)."""
    partial = float((rope_scaling or {}).get("partial_rotary_factor") or 1.0)
    dim = int(head_dim * partial)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(
            f"partial_rotary_factor={partial} gives {dim} rotary dimensions of a {head_dim}-dimension head; "
            "it must be a positive even number no larger than the head"
        )
    return dim


def _original_len(cfg: dict[str, Any], max_position_embeddings: int | None) -> int:
    original = cfg.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
        raise KeyError("original_max_position_embeddings")
    return int(original)


def _scaling_factor(cfg: dict[str, Any], max_position_embeddings: int | None, original: int) -> float:
    """``factor``, or (as transformers does without it) the ratio of the context lengths."""
    if cfg.get("factor") is not None:
        return float(cfg["factor"])
    if max_position_embeddings is None:
        raise KeyError("factor")
    return max_position_embeddings / original


def _ntk_base(
    base: float, factor: float, seq_len: int | torch.Tensor | None, max_pos: int, dim: int
) -> float | torch.Tensor:
    """Dynamic NTK: the RoPE base grows with the sequence once it is longer than ``max_pos``; an int (or
    None) computes in double as transformers does at load time, a tensor in fp32 as its forward does."""
    if seq_len is None:
        seq_len = max_pos
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.clamp(seq_len, min=max_pos)
    else:
        seq_len = max(seq_len, max_pos)
    return base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))


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


def _yarn_inv_freq(dim: int, base: float, cfg: dict[str, Any], max_pos: int) -> torch.Tensor:
    """YaRN: dimensions that turn many times over the original context keep their frequency, those that
    turn less than once are interpolated by ``factor``, with a linear ramp between (in dimension index)."""
    if "factor" not in cfg:  # required (transformers too), though it may be None: the context-length ratio
        raise KeyError("factor")
    original = _original_len(cfg, max_pos)
    factor = _scaling_factor(cfg, max_pos, original)
    fast, slow = cfg.get("beta_fast") or 32, cfg.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns ``rotations`` times over ``original``
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # per dimension: 1 keeps the frequency, 0 interpolates it
    wavelength_scale = base ** (torch.arange(0, dim, 2).float() / dim)  # 1 / inv_freq
    return 1.0 / (factor * wavelength_scale) * (1 - keep) + 1.0 / wavelength_scale * keep


def _longrope_inv_freq(
    dim: int, base: float, cfg: dict[str, Any], max_pos: int | None, seq_len: int | None
) -> torch.Tensor:
    """LongRoPE (Phi-3): per-dimension divisors, ``short_factor`` for sequences within the original context
    and ``long_factor`` beyond it."""
    original = _original_len(cfg, max_pos)
    key = "long_factor" if seq_len is not None and seq_len > original else "short_factor"
    divisors = torch.tensor(cfg[key], dtype=torch.float32)
    if divisors.shape != (dim // 2,):
        raise ValueError(
            f"rope_scaling {key} has {divisors.numel()} entries, expected the rotary dimension / 2 = {dim // 2}"
        )
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (divisors * base**exponent)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table [max_positions, R/2] (each) in the model dtype."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        rope_scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device,
        max_position_embeddings: int | None = None,
    ) -> None:
        """``max_positions`` rows; ``max_position_embeddings`` is the config's value (default: the same)."""
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim (got {head_dim})")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim(head_dim, rope_scaling)
        config_len = max_positions if max_position_embeddings is None else max_position_embeddings
        inv_freq = position_inv_freq(self.rotary_dim, base, rope_scaling, config_len, max_positions).to(
            device
        )
        t = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None]
        freqs = t * inv_freq  # [P, R/2] fp32, cast only after cos/sin as the reference does
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, R]
        scale = attention_factor(rope_scaling, config_len)
        if scale != 1.0:
            cos_sin = cos_sin * scale
        self.register_buffer("cos_sin_cache", cos_sin.to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, R/2], shared by every layer of one forward."""
        cos_sin = self.cos_sin_cache.index_select(0, positions)  # [T, R]
        cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def rotate_owned(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` for an x the caller owns (a slice of a fresh projection output): on CPU the compiled
    kernel rotates it in place in one call instead of six tensor ops; elsewhere a new tensor as apply_rotary."""
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and cos.dtype == x.dtype
        and x.stride(2) == 1
        and x.stride(1) == x.shape[2]
        and cos.stride(-1) == 1
        and sin.data_ptr() == cos.data_ptr() + cos.shape[-1] * cos.element_size()
        and sin.stride(0) == cos.stride(0)
        and cpu_kernels.available()
    ):
        cpu_kernels.rotary_(x, cos.view(cos.shape[0], -1), 2 * cos.shape[-1])
        return x
    return apply_rotary(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, n, D] (any strides, e.g. q and k as one slice of the qkv output) -> new [T, n, D]; cos and
    sin [T, 1, R/2] rotate the first R dimensions, the rest are copied."""
    half = cos.shape[-1]
    rot = 2 * half
    x1, x2 = x[..., :half], x[..., half:rot]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:rot]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)  # x2 cos + x1 sin
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out
