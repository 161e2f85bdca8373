"""Attention: the layer, its per-step metadata and backends."""

from tidellm.model_executor.layers.attention.layer import Attention, uniform_sliding_window, write_kv_cache
from tidellm.model_executor.layers.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk

__all__ = [
    "Attention",
    "AttentionMetadata",
    "DecodeBatch",
    "PrefillChunk",
    "uniform_sliding_window",
    "write_kv_cache",
]
