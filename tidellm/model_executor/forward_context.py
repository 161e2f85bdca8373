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


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("tidellm_forward_context", default=None)


@contextmanager
def set_forward_context(
    attn_metadata: AttentionMetadata, kv_caches: Sequence[torch.Tensor]
) -> Iterator[ForwardContext]:
    """Make ``attn_metadata`` and ``kv_caches`` visible to the attention layers inside the block."""
    ctx = ForwardContext(attn_metadata, kv_caches)
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
