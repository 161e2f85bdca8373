"""Gated activations on the merged gate_up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]``: the SwiGLU gate on a merged [gate | up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        out = F.silu(x[..., :d])  # [..., d], a fresh tensor we may update in place
        return out.mul_(x[..., d:])


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(x[..., :d]) * x[..., d:]``: Gemma's GeGLU (``gelu_pytorch_tanh``) on a merged [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        out = F.gelu(x[..., :d], approximate="tanh")  # [..., d], fresh
        return out.mul_(x[..., d:])
