"""Gated activations on the merged gate_up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.kernels import cpu as cpu_kernels


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]``: the SwiGLU gate on a merged [gate | up] projection (on CPU one
    compiled-kernel call with the same roundings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dim() == 2
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous()
            and cpu_kernels.available()
        ):
            return cpu_kernels.silu_and_mul(x)
        d = x.shape[-1] // 2
        out = F.silu(x[..., :d])  # [..., d], a fresh tensor we may update in place
        return out.mul_(x[..., d:])


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(x[..., :d]) * x[..., d:]``: Gemma's GeGLU (``gelu_pytorch_tanh``) on a merged [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        out = F.gelu(x[..., :d], approximate="tanh")  # [..., d], fresh
        return out.mul_(x[..., d:])
