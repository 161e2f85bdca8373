"""Token embedding and the LM head, which may share the embedding matrix (``tie_word_embeddings``).

Either may hold its matrix as blocks (``use_blocks``, set by ``model_executor/quant``): the embedding then
widens only the rows it looks up, and the head multiplies through the block kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.model_executor.layers.linear import matmul_in_fp32
from tidellm.model_executor.layers.weight_utils import default_weight_loader


class _VocabMatrix(nn.Module):
    """A [vocab, hidden] matrix, dense (``weight``) or as blocks (``qweight``)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.qweight = None  # a QuantizedTensor once use_blocks was called
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V, H]
        self.weight.weight_loader = default_weight_loader

    def use_blocks(self, method) -> None:
        """Store the matrix with ``method`` (a ``BlockQuantMethod``) instead of densely."""
        self.quant_method = method
        self.qweight = method.empty(self.vocab_size, self.hidden_size)
        self.weight = nn.Parameter(
            torch.empty(0, dtype=self.dtype), requires_grad=False
        )  # a name to load into
        self.weight.weight_loader = lambda _param, loaded: method.store(self.qweight, loaded, None)


class VocabEmbedding(_VocabMatrix):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.rows(input_ids).dequantize().to(self.dtype)  # [T, H]
        return F.embedding(input_ids, self.weight)  # [T] -> [T, H]


class LMHead(_VocabMatrix):
    """Hidden states to vocabulary logits; with ``tied_to`` it reuses the embedding's matrix (one tensor,
    loaded once and counted once)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tied_to: VocabEmbedding | None = None,
    ) -> None:
        if tied_to is None:
            super().__init__(vocab_size, hidden_size, dtype, device)
        else:
            nn.Module.__init__(self)
            self.dtype = dtype
        self.tied = tied_to is not None
        self._tied_to = (tied_to,)  # a tuple, so the embedding is not registered (and counted) twice
        self.matmul_in_fp32 = matmul_in_fp32(dtype, device)

    @property
    def source(self) -> _VocabMatrix:
        """The module that holds the matrix: the embedding when tied, else this head."""
        return self._tied_to[0] or self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (the sampler works in fp32 whatever the model dtype)."""
        src = self.source
        if src.qweight is not None:
            return src.quant_method.matmul(hidden, src.qweight, fp32_out=True).float()
        if self.matmul_in_fp32:
            return F.linear(hidden.float(), src.weight.float())
        return F.linear(hidden, src.weight).float()
