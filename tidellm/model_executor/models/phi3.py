"""Phi-3 (Phi3ForCausalLM): the llama decoder, with checkpoints that store q/k/v as one ``qkv_proj`` and
gate/up as one ``gate_up_proj`` matrix.

Our merged layers load shard by shard, so the fused tensors are cut into their q/k/v and gate/up rows on
the way in (the quantization swap then sees the same shards as for llama). Phi-3's rows are ordered
``[q | k | v]`` and ``[gate | up]``, the order of our merged layers. LongRoPE (the 128k models) and partial
rotary embeddings (Phi-4-mini) come from the rotary layer; a configured sliding window applies to every layer
(llama.SLIDES_EVERY_LAYER), as in transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ArchConfig, *args, **kwargs) -> None:
        super().__init__(arch, *args, **kwargs)
        rope = arch.rope_scaling or {}
        if rope.get("rope_type") == "longrope":
            logger.warning(
                "%s: LongRoPE positions from %s on use the long factors and earlier ones the short factors. "
                "transformers' Phi-3 generate instead re-encodes the whole sequence with the long factors once "
                "it grows past that length, so longer outputs may differ from it.",
                arch.architecture,
                rope.get("original_max_position_embeddings"),
            )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        arch = self.arch
        q_rows = arch.num_attention_heads * arch.head_dim
        kv_rows = arch.num_key_value_heads * arch.head_dim
        splits = {
            ".self_attn.qkv_proj.": ((".q_proj.", q_rows), (".k_proj.", kv_rows), (".v_proj.", kv_rows)),
            ".mlp.gate_up_proj.": (
                (".gate_proj.", arch.intermediate_size),
                (".up_proj.", arch.intermediate_size),
            ),
        }
        for name, tensor in weights:
            fused = next((f for f in splits if f in name), None)
            if fused is None:
                yield name, tensor
                continue
            parts = splits[fused]
            rows = sum(n for _, n in parts)
            if tensor.shape[0] != rows:
                raise ValueError(
                    f"Cannot load weight {name!r}: checkpoint shape {tuple(tensor.shape)} has {tensor.shape[0]} "
                    f"rows, expected {rows} ({' + '.join(str(n) for _, n in parts)})"
                )
            prefix = name[: name.index(fused)]
            suffix = name[name.index(fused) + len(fused) :]
            owner = fused.rsplit(".", 2)[0]  # ".self_attn" or ".mlp"
            names = [f"{prefix}{owner}{part}{suffix}" for part, _ in parts]
            yield from zip(names, tensor.split([n for _, n in parts]), strict=True)
