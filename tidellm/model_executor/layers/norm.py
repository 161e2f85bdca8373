"""RMSNorm, with the residual add folded in so a decoder layer allocates one tensor less per norm.

On CPU in fp32 or bf16 the add and the norm are one compiled pass (``kernels/cpu``): ``F.rms_norm`` is five ATen
ops there, about 16-40 us per call for a single token, 61 calls per step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.kernels import cpu as cpu_kernels


class RMSNorm(nn.Module):
    """Llama's RMSNorm. ``F.rms_norm`` computes in fp32 for bf16/fp16 inputs, weight multiply included, and
    rounds once; the Hugging Face reference rounds before the weight multiply too (one bf16 ulp apart)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self._use_kernel: bool | None = None  # decided on the first call (fp32 on a CPU with the kernels)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with a residual: ``(norm(x + residual), x + residual)``.

        The sum is written into ``x`` in place: callers pass a fresh activation (a projection output)."""
        if self._use_kernel is None:
            self._use_kernel = (
                x.dtype in (torch.float32, torch.bfloat16)
                and x.dtype == self.weight.dtype
                and x.device.type == "cpu"
                and cpu_kernels.available()
            )
        if self._use_kernel and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            out = cpu_kernels.rms_norm(x, residual, self.weight, self.eps)  # one pass, no thread wake-ups
            return out if residual is None else (out, x)
        if residual is None:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        x = x.add_(residual)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm, which scales by ``1 + w`` (checkpoints store ``w``, centred on zero).

    The weight is loaded as ``1 + w`` (added in fp32, as the reference does), so the forward, the fused
    residual add and the CPU kernel are RMSNorm's. In bf16 that sum is rounded to bf16 once, where the
    reference keeps it in fp32: a relative difference below 2**-9 in the scale, inside bf16's own rounding."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(hidden_size, eps, dtype, device)
        self.weight.weight_loader = _load_one_plus

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, weight stored as 1 + w"


def _load_one_plus(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded.float() + 1.0)
