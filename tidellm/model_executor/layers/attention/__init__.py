"""Attention: the layer, its per-step metadata and backends."""

from tidellm.model_executor.layers.attention.layer import Attention, layer_windows, write_kv_cache
from tidellm.model_executor.layers.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk

__all__ = [
    "Attention",
    "AttentionMetadata",
    "DecodeBatch",
    "PrefillChunk",
    "layer_windows",
    "write_kv_cache",
]
