"""RMSNorm, with the residual add folded in so a decoder layer allocates one tensor less per norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Llama's RMSNorm. ``F.rms_norm`` computes in fp32 for bf16/fp16 inputs and casts back before the
    weight multiply, the same rounding as the Hugging Face reference."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with a residual: ``(norm(x + residual), x + residual)``.

        The sum is written into ``x`` in place: callers pass a fresh activation (a projection output)."""
        if residual is None:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        x = x.add_(residual)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
