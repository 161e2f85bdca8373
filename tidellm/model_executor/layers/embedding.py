"""Token embedding and the LM head, which may share the embedding matrix (``tie_word_embeddings``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.layers.linear import matmul_in_fp32
from tidellm.model_executor.layers.weight_utils import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V, H]
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # [T] -> [T, H]


class LMHead(nn.Module):
    """Hidden states to vocabulary logits; with ``tied_to`` it reuses the embedding's weight parameter
    (one tensor, so it is loaded once and counted once)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tied_to: VocabEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
            self.weight = nn.Parameter(weight, requires_grad=False)  # [V, H]
            self.weight.weight_loader = default_weight_loader
        self.matmul_in_fp32 = matmul_in_fp32(dtype, device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (the sampler works in fp32 whatever the model dtype)."""
        if self.matmul_in_fp32:
            return F.linear(hidden.float(), self.weight.float())
        return F.linear(hidden, self.weight).float()
