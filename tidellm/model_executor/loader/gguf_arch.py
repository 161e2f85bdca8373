"""GGUF metadata -> ArchConfig, in Hugging Face terms.

llama.cpp keeps hyper-parameters under ``<general.architecture>.*`` keys and leaves out what it hard-codes
per family (Gemma 3's local RoPE base and sliding-window layer pattern); those are filled in here so that a
model class never needs to know where its config came from.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tidellm.config.arch import ArchConfig, MoEConfig
from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.loader.families import GGUF_ARCHITECTURES, SUPPORTED_MODEL_TYPES
from tidellm.model_executor.loader.gguf_file import GGUFFile
from tidellm.model_executor.loader.gguf_weights import dequantize
from tidellm.tokenizer.gguf_tokenizer import gguf_eos_ids

logger = logging.getLogger(__name__)

# Gemma 3 facts llama.cpp hard-codes rather than storing (src/llama-model.cpp): every 6th layer is global.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


def gguf_family(gguf: GGUFFile) -> str:
    """HF model_type for the file's ``general.architecture``, or ModelLoadError naming the supported list."""
    arch = gguf.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf.path} has architecture {arch!r}, which is not supported. Supported GGUF "
            f"architectures: {', '.join(GGUF_ARCHITECTURES)} (model families: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    return GGUF_ARCHITECTURES[arch]


def _uniform(value: Any, key: str, gguf: GGUFFile) -> int:
    """Per-layer arrays (some files store head counts per layer) must be uniform for our models."""
    if isinstance(value, (np.ndarray, list)):
        values = {int(v) for v in value}
        if len(values) != 1:
            raise ModelLoadError(
                f"GGUF file {gguf.path}: {key} varies per layer ({sorted(values)}), which is not supported."
            )
        return values.pop()
    return int(value)


def arch_from_gguf(gguf: GGUFFile) -> ArchConfig:
    family = gguf_family(gguf)
    prefix = gguf.get("general.architecture")
    if family == "llama" and int(gguf.get(f"{prefix}.expert_count", 0) or 0) > 0:
        family = "mixtral"  # llama.cpp writes Mixtral as a llama with experts

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gguf.get(f"{prefix}.{name}", default)
        if value is None and required:
            raise ModelLoadError(
                f"GGUF file {gguf.path} lacks metadata key {prefix}.{name}; it is incomplete or was written by an "
                "old converter. Re-convert it with a recent llama.cpp."
            )
        return value

    hidden = int(key("embedding_length", required=True))
    heads = _uniform(key("attention.head_count", required=True), "attention.head_count", gguf)
    kv_heads = _uniform(key("attention.head_count_kv", heads), "attention.head_count_kv", gguf)
    head_dim = int(key("attention.key_length", hidden // heads))
    layers = int(key("block_count", required=True))
    tensors = gguf.tensors
    embed = tensors.get("token_embd.weight")
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size")
    if vocab is None:
        vocab = embed.shape[0] if embed is not None else len(tokens or ())
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    arch = ArchConfig(
        architecture=SUPPORTED_MODEL_TYPES[family],
        model_type=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=_uniform(key("feed_forward_length", required=True), "feed_forward_length", gguf),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(key),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=gguf_eos_ids(gguf.metadata),
        checkpoint_dtype=_checkpoint_dtype(gguf),
        extra={"gguf_architecture": prefix, "gguf_file_type": gguf.get("general.file_type")},
    )
    if "rope_freqs.weight" in tensors:
        # Llama 3.1-style files bake the RoPE frequency factors into a tensor instead of rope_scaling keys.
        arch.extra["rope_freq_factors"] = True
        logger.warning(
            "%s stores RoPE frequency factors (rope_freqs.weight); they are not applied", gguf.path
        )
    if family == "gemma3":
        _gemma3_extras(arch, key)
    if family == "phi3":
        _phi3_extras(arch, key, gguf)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        arch.moe = _moe(family, key, tensors, layers, arch.intermediate_size)
    return arch


def _moe(family: str, key: Any, tensors: dict, layers: int, intermediate: int) -> MoEConfig:
    """The sparse MLP settings llama.cpp stores as keys, plus what it hard-codes per family: Qwen2-MoE keeps
    the raw softmax weights of the top k, Qwen3-MoE and Mixtral renormalize them (norm_w in its graphs).
    Layers without a router tensor keep a dense MLP."""
    return MoEConfig(
        num_experts=int(key("expert_count", required=True)),
        num_experts_per_tok=int(key("expert_used_count", required=True)),
        intermediate_size=int(key("expert_feed_forward_length", intermediate)),
        renormalize=family != "qwen2_moe",
        shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length", 0) or 0),
        mlp_only_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors),
    )


def _f32(value: Any) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06. Use the shortest decimal that rounds to the
    same float32, which is the value the original config.json held."""
    return float(str(np.float32(value)))


def _rope_scaling(key: Any) -> dict[str, Any] | None:
    kind = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 0, 1.0):
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = key("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _checkpoint_dtype(gguf: GGUFFile) -> str | None:
    """float16/bfloat16 when the matrices are stored so; None for quantized files (dequantized to fp32)."""
    kinds = {t.qtype.name for t in gguf.tensors.values() if len(t.shape) == 2}
    return (
        {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(kinds.pop()) if len(kinds) == 1 else None
    )


def _phi3_extras(arch: ArchConfig, key: Any, gguf: GGUFFile) -> None:
    """Phi-3's window, partial rotary (Phi-4-mini) and LongRoPE (the 128k models), which llama.cpp stores as
    keys and two factor tensors, back in the HF rope_scaling shape hf_config gives."""
    window = key("attention.sliding_window")
    arch.sliding_window = int(window) if window else None
    scaling: dict[str, Any] = {}
    rotary = key("rope.dimension_count")
    if rotary is not None and int(rotary) != arch.head_dim:
        scaling["partial_rotary_factor"] = int(rotary) / arch.head_dim
    long, short = gguf.tensors.get("rope_factors_long.weight"), gguf.tensors.get("rope_factors_short.weight")
    if long is not None and short is not None:
        scaling.update(
            rope_type="longrope",
            long_factor=[float(x) for x in dequantize(gguf.raw(long), long.qtype, long.shape)],
            short_factor=[float(x) for x in dequantize(gguf.raw(short), short.qtype, short.shape)],
            original_max_position_embeddings=int(
                key("rope.scaling.original_context_length", arch.max_position_embeddings)
            ),
        )
        attn_factor = key("rope.scaling.attn_factor")
        if attn_factor is not None:
            scaling["attention_factor"] = float(attn_factor)
    arch.rope_scaling = scaling or None


def _gemma3_extras(arch: ArchConfig, key: Any) -> None:
    window = key("attention.sliding_window")
    arch.sliding_window = None if window is None else int(window)
    arch.hidden_act = "gelu_pytorch_tanh"
    arch.qk_norm = True
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (hidden / heads).
    scalar = arch.hidden_size // arch.num_attention_heads if arch.num_hidden_layers == 62 else arch.head_dim
    arch.extra.update(
        query_pre_attn_scalar=scalar,
        rope_local_base_freq=_GEMMA3_LOCAL_ROPE_BASE,
        sliding_window_pattern=_GEMMA3_SLIDING_PATTERN,
        layer_types=[
            "full_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
            for i in range(arch.num_hidden_layers)
        ],
        final_logit_softcapping=key("final_logit_softcapping"),
        attn_logit_softcapping=key("attn_logit_softcapping"),
    )
