"""Architecture description of a loaded model, independent of where it came from.

Both loaders (Hugging Face folders and GGUF files) produce one of these, and every model class is
built from one, so a model never parses config.json or GGUF metadata itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoEConfig:
    """Mixture-of-experts MLP settings (Mixtral, Qwen2-MoE, Qwen3-MoE), in one shape for every family."""

    num_experts: int
    num_experts_per_tok: int  # top k
    intermediate_size: int  # of one routed expert
    # Rescale the top-k routing weights to sum to one (Mixtral always; Qwen MoE when norm_topk_prob).
    renormalize: bool
    # Qwen2-MoE's always-on expert, scaled by a sigmoid gate; 0 = none.
    shared_expert_intermediate_size: int = 0
    # Layer i has the sparse MLP when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers;
    # the other layers keep a dense MLP of the model's intermediate_size (Qwen MoE).
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class ArchConfig:
    """Hyper-parameters of a decoder (or encoder) model, in Hugging Face terms."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    model_type: str  # HF model_type, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style rope scaling dict ({"rope_type": "llama3", "factor": ...}) or None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Family flags (qwen3 q/k norm, sliding window, ...) grow here as families are added.
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # dtype the checkpoint was saved in ("float32", "bfloat16", "float16"), if known.
    checkpoint_dtype: str | None = None
    # Sparse MLP settings of a mixture-of-experts family; None for dense models.
    moe: MoEConfig | None = None
    # Anything else from the source config, for families that need more.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_context_len(self) -> int:
        """The longest sequence the position encoding is configured for. RoPE scaling that extends a base
        context says so: YaRN and dynamic NTK configs (Qwen's YaRN recipe keeps max_position_embeddings at the
        base 32768 with factor 4) reach base x factor, the base being original_max_position_embeddings when
        given; linear, llama3 and LongRoPE configs already state the extended length in
        max_position_embeddings (Llama 3.1: 131072), unless they name a smaller original one."""
        cfg = self.rope_scaling or {}
        factor = float(cfg.get("factor") or 1.0)
        kind = cfg.get("rope_type", "default")
        if factor <= 1.0 or kind in ("default", "llama3", "longrope"):
            return self.max_position_embeddings
        original = cfg.get("original_max_position_embeddings")
        if original:
            return max(self.max_position_embeddings, int(original * factor))
        if kind in ("yarn", "dynamic"):
            return int(self.max_position_embeddings * factor)
        return self.max_position_embeddings
