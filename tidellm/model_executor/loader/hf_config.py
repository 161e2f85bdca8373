"""config.json -> ArchConfig, for both transformers v4 and v5 layouts.

v4 writes ``torch_dtype``, a top-level ``rope_theta`` and ``rope_scaling``; v5 writes ``dtype`` and a
``rope_parameters`` dict holding ``rope_theta`` and ``rope_type`` (for Gemma 3, one dict per layer type).
Both end up as the same ArchConfig: ``rope_scaling`` is None for plain RoPE, else an HF-style dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidellm.config.arch import ArchConfig, MoEConfig
from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.loader.families import SUPPORTED_MODEL_TYPES, check_model_type

# Mixture-of-experts families: transformers' config defaults for the keys config.json may omit.
_MOE_DEFAULTS: dict[str, dict[str, int]] = {
    "mixtral": {"num_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
    },
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
}  # fmt: skip
# Keys consumed into ArchConfig fields; everything else in config.json is kept in ``extra``.
_CONSUMED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "hidden_activation", "sliding_window", "use_sliding_window", "bos_token_id",
    "eos_token_id", "torch_dtype", "dtype", "qkv_bias", *(k for d in _MOE_DEFAULTS.values() for k in d),
    "num_local_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
}  # fmt: skip
# Family defaults that transformers' config classes apply when config.json omits the key.
_TIED_BY_DEFAULT = {"gemma3": True}
_QK_NORM = {"qwen3", "gemma3", "qwen3_moe"}
_QKV_BIAS_BY_DEFAULT = {"qwen2", "qwen2_moe"}


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling or None, local rope base for sliding layers or None)."""
    params = config.get("rope_parameters")
    local_base = config.get("rope_local_base_freq")
    if isinstance(params, dict) and "full_attention" in params:  # v5 Gemma 3: one dict per layer type
        local_base = (params.get("sliding_attention") or {}).get("rope_theta", local_base)
        params = params["full_attention"]
    if isinstance(params, dict):  # v5
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # v4
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if config.get("model_type") == "phi3" and scaling.get("rope_type") in ("su", "yarn"):
        scaling["rope_type"] = "longrope"  # transformers' Phi-3 reads both old names as LongRoPE
    if scaling.get("rope_type") in ("llama3", "yarn", "longrope"):
        # A top-level original_max_position_embeddings (Phi-3) wins, as in transformers.
        original = (
            config.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or config.get("max_position_embeddings", 2048)
        )
        scaling["original_max_position_embeddings"] = int(original)
    partial = float(scaling.pop("partial_rotary_factor", None) or config.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        scaling["partial_rotary_factor"] = partial  # kept even for plain RoPE: the rotary layer needs it
    if scaling.get("rope_type", "default") == "default" and "partial_rotary_factor" not in scaling:
        scaling_or_none = None
    else:
        scaling_or_none = scaling
    return float(theta), scaling_or_none, None if local_base is None else float(local_base)


def _sliding_window(config: dict[str, Any], family: str) -> int | None:
    window = config.get("sliding_window")
    # Qwen configs carry a sliding_window value even when use_sliding_window is false.
    if window is None or (
        family.startswith(("qwen2", "qwen3")) and not config.get("use_sliding_window", False)
    ):
        return None
    return int(window)


def _moe(config: dict[str, Any], family: str) -> MoEConfig | None:
    """The sparse MLP settings of a mixture-of-experts family, whatever each family calls them."""
    defaults = _MOE_DEFAULTS.get(family)
    if defaults is None:
        return None
    cfg = {**defaults, **{k: v for k, v in config.items() if v is not None}}
    # The expert count is num_local_experts or num_experts, depending on the family and transformers version.
    cfg["num_experts"] = cfg.get("num_local_experts", cfg["num_experts"])
    if family == "mixtral":  # every layer sparse; the expert size is intermediate_size; always renormalized
        return MoEConfig(
            num_experts=int(cfg["num_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            intermediate_size=int(cfg["intermediate_size"]),
            renormalize=True,
        )
    return MoEConfig(
        num_experts=int(cfg["num_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def arch_from_hf_config(config: dict[str, Any], folder: Path) -> ArchConfig:
    model_type = str(config.get("model_type", ""))
    if model_type == "gemma3" and "text_config" in config:
        raise ModelLoadError(
            f"{folder}: this is the multimodal Gemma 3 checkpoint; only the text-only model (model_type "
            "'gemma3_text', Gemma3ForCausalLM) is supported."
        )
    family = check_model_type(model_type, str(folder))
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        theta, scaling, local_base = _rope(config)
        eos = config.get("eos_token_id")
        arch = ArchConfig(
            architecture=(config.get("architectures") or [SUPPORTED_MODEL_TYPES[family]])[0],
            model_type=family,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", config.get("layer_norm_eps", 1e-6))),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", _TIED_BY_DEFAULT.get(family, False))),
            # Qwen2 always has q/k/v biases (its config has no attention_bias key); Qwen2-MoE says qkv_bias.
            attention_bias=bool(
                config.get("attention_bias", config.get("qkv_bias", family in _QKV_BIAS_BY_DEFAULT))
            ),
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_act=str(config.get("hidden_activation") or config.get("hidden_act") or "silu"),
            qk_norm=family in _QK_NORM,
            sliding_window=_sliding_window(config, family),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
            moe=_moe(config, family),
            extra={k: v for k, v in config.items() if k not in _CONSUMED},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(
            f"{folder}/config.json is missing or has an invalid value for {e}; restore config.json from the "
            "original model."
        ) from e
    if local_base is not None:
        arch.extra["rope_local_base_freq"] = local_base
    return arch
