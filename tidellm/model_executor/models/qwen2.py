"""Qwen2 / Qwen2.5 and Qwen3: the llama decoder with family flags.

Qwen2 has biases on q/k/v but none on o_proj (and usually an untied LM head); Qwen3 drops the q/k/v biases
and normalises q and k per head (RMSNorm over head_dim) before RoPE. Both differences live in llama.py as
flags: ``o_proj_bias`` here, ``ArchConfig.qk_norm`` and ``attention_bias`` from the checkpoint's config.
"""

from __future__ import annotations

from tidellm.model_executor.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    o_proj_bias = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3's ``attention_bias`` covers q/k/v and o_proj alike, as in llama; q/k norm comes from the
    config (``qk_norm``)."""
