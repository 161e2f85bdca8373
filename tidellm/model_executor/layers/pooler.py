"""Pooling: the packed token states of a step -> one embedding per request (mean / CLS / last, then L2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.layers.attention.encoder import EncoderMetadata
from tidellm.model_executor.loader.pooling_config import PoolingConfig


class Pooler(nn.Module):
    """Reduces each request's rows with the checkpoint's pooling, in fp32 whatever the model dtype."""

    def __init__(self, config: PoolingConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """hidden [T, H] (requests packed as in ``meta``) -> [B, H] float32."""
        mode = self.config.mode
        starts = meta.query_start_loc[:-1]
        if mode == "cls":
            pooled = hidden.index_select(0, starts).float()
        elif mode == "last":
            pooled = hidden.index_select(0, meta.query_start_loc[1:] - 1).float()
        else:  # mean over every token of the request, special tokens included (as sentence-transformers)
            sums = hidden.new_zeros(meta.num_reqs, hidden.shape[1], dtype=torch.float32)
            sums.index_add_(0, meta.seq_idx, hidden.float())
            pooled = sums / meta.seq_lens.unsqueeze(1).to(torch.float32)
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def extra_repr(self) -> str:
        return f"mode={self.config.mode}, normalize={self.config.normalize}"
