"""The state every attention layer needs for one forward pass: the step's metadata and the KV caches.

It lives in a ``ContextVar`` set by a ``with`` block, so it is scoped to one step of one engine: two engines
in one process (or two threads) never see each other's metadata, and nothing survives the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tidellm.model_executor.layers.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class ForwardContext:
    attn_metadata: AttentionMetadata
    # One tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim].
    kv_caches: Sequence[torch.Tensor]
    # Per layer, the metadata of its KV-cache group when the model has several (else None: attn_metadata).
    layer_metadata: Sequence[AttentionMetadata] | None = None

    def metadata_for(self, layer_idx: int) -> AttentionMetadata:
        return self.attn_metadata if self.layer_metadata is None else self.layer_metadata[layer_idx]


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("tidellm_forward_context", default=None)


@contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata,
    kv_caches: Sequence[torch.Tensor],
    layer_metadata: Sequence[AttentionMetadata] | None = None,
) -> Iterator[ForwardContext]:
    """Make ``attn_metadata`` and ``kv_caches`` visible to the attention layers inside the block."""
    ctx = ForwardContext(attn_metadata, kv_caches, layer_metadata)
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError(
            "The model was called outside `with set_forward_context(attn_metadata, kv_caches):`; the attention "
            "layers need the step's metadata and KV caches."
        )
    return ctx
