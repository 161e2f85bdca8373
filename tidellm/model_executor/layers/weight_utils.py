"""The loader every parameter without a special layout uses."""

from __future__ import annotations

import torch
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy (and cast to the parameter's dtype/device) a whole tensor after checking its shape."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)
