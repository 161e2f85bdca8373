"""Gemma 3 (text only: ``Gemma3ForCausalLM``, model_type ``gemma3_text``, GGUF arch ``gemma3``) over a paged
KV cache.

Reads like Hugging Face's ``modeling_gemma3``: scaled embedding -> decoder layers (input_layernorm, self_attn
with q/k norms, post_attention_layernorm, pre_feedforward_layernorm, GeGLU mlp, post_feedforward_layernorm)
-> norm -> tied lm_head. Local layers attend within a sliding window and rotate with their own RoPE base;
every ``sliding_window_pattern``-th layer (or as ``layer_types`` says) is global. Differences from the
reference are for speed only: merged q/k/v and gate/up matmuls, the ``1 + w`` norm scale folded into the
weight at load time (``GemmaRMSNorm``), and the residual adds folded into the following norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.layers.activation import GeluTanhAndMul
from tidellm.model_executor.layers.attention import Attention
from tidellm.model_executor.layers.embedding import LMHead, VocabEmbedding
from tidellm.model_executor.layers.linear import Linear, QKVLinear
from tidellm.model_executor.layers.norm import GemmaRMSNorm
from tidellm.model_executor.layers.rotary import RotaryEmbedding, rotate_owned
from tidellm.model_executor.models.llama import STACKED_PARAMS, LlamaForCausalLM, LlamaMLP

RotaryCosSin = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, head_dim / 2] each

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_SLIDING_PATTERN = 6  # transformers' default: every 6th layer is global
DEFAULT_LOCAL_ROPE_BASE = 10_000.0
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256


def layer_is_sliding(arch: ArchConfig) -> list[bool]:
    """Per layer: True for a local (sliding-window, local RoPE base) layer, False for a global one."""
    n = arch.num_hidden_layers
    types = arch.extra.get("layer_types")
    if types is None:
        pattern = int(arch.extra.get("sliding_window_pattern") or DEFAULT_SLIDING_PATTERN)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or not set(types) <= {SLIDING, FULL}:
        raise ValueError(
            f"{arch.architecture}: layer_types must list {n} entries of {SLIDING!r} / {FULL!r} (got {types!r})"
        )
    return [t == SLIDING for t in types]


class Gemma3Attention(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        layer_idx: int,
        is_sliding: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.is_sliding = is_sliding
        kw = dict(bias=arch.attention_bias, dtype=dtype, device=device)
        self.qkv_proj = QKVLinear(arch.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, **kw)
        self.o_proj = Linear(self.num_heads * self.head_dim, arch.hidden_size, **kw)
        self.q_norm = GemmaRMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device)
        self.k_norm = GemmaRMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device)
        scalar = float(arch.extra.get("query_pre_attn_scalar") or DEFAULT_QUERY_PRE_ATTN_SCALAR)
        self.attn = Attention(
            self.num_heads, self.head_dim, self.num_kv_heads, layer_idx, scale=scalar**-0.5,
            sliding_window=arch.sliding_window if is_sliding else None,
        )  # fmt: skip

    def forward(self, hidden: torch.Tensor, cos_sin: RotaryCosSin) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        # Norm over each head's dimensions, before RoPE (contiguous copies: the fused norm kernel takes them).
        q = self.q_norm(qkv[:, :q_size].reshape(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(
            qkv[:, q_size : q_size + kv_size].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        )
        q, k = rotate_owned(q, *cos_sin), rotate_owned(k, *cos_sin)  # [T, H, D], [T, Hkv, D]
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v))  # [T, H D] -> [T, hidden]


class Gemma3DecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        layer_idx: int,
        is_sliding: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Gemma3Attention(arch, layer_idx, is_sliding, dtype, device)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(arch, dtype, device, act_fn=GeluTanhAndMul())  # GeGLU, no biases
        self.post_feedforward_layernorm = norm()

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin_global: RotaryCosSin,
        cos_sin_local: RotaryCosSin,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it); their sum is the HF hidden state."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        cos_sin = cos_sin_local if self.self_attn.is_sliding else cos_sin_global
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos_sin))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype, device)
        # sqrt(hidden) rounded to the model dtype, as the reference multiplies it.
        self.register_buffer(
            "embed_scale", torch.tensor(arch.hidden_size**0.5, dtype=dtype, device=device), persistent=False
        )
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(arch, i, sliding, dtype, device)
            for i, sliding in enumerate(layer_is_sliding(arch))
        )
        self.norm = GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        max_pos = arch.max_context_len
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, max_pos, arch.rope_theta, arch.rope_scaling, dtype, device,
            max_position_embeddings=arch.max_position_embeddings,
        )  # fmt: skip
        local_base = float(arch.extra.get("rope_local_base_freq") or DEFAULT_LOCAL_ROPE_BASE)
        self.rotary_emb_local = RotaryEmbedding(arch.head_dim, max_pos, local_base, None, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale  # [T, hidden]
        cos_sin_global = self.rotary_emb(positions)
        cos_sin_local = self.rotary_emb_local(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos_sin_global, cos_sin_local)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS  # read by the quantization swap to name each merged layer's shards

    def __init__(
        self, arch: ArchConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> None:
        super().__init__()
        device = torch.device("cpu") if device is None else torch.device(device)
        _check_supported(arch)
        self.arch = arch
        self.model = Gemma3Model(arch, dtype, device)
        tied = self.model.embed_tokens if arch.tie_word_embeddings else None
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype, device, tied_to=tied)
        self.final_logit_softcapping = arch.extra.get("final_logit_softcapping")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] (the step's flattened tokens) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # [N, hidden] -> [N, vocab] fp32
        cap = self.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap).mul_(cap)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors; raises ValueError naming every missing or unexpected weight.

        The names and merged shards are Llama's (plus the extra norms, which load as parameters of their
        own), so the Llama loader serves unchanged."""
        return LlamaForCausalLM.load_weights(self, weights)


def _check_supported(arch: ArchConfig) -> None:
    """Refuse configurations this class does not implement rather than compute something else."""
    if arch.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"{arch.architecture}: hidden_activation {arch.hidden_act!r} is not supported (Gemma 3 uses "
            "'gelu_pytorch_tanh')"
        )
    if arch.extra.get("attn_logit_softcapping") is not None:
        raise ValueError(
            f"{arch.architecture}: attention logit soft-capping (attn_logit_softcapping="
            f"{arch.extra['attn_logit_softcapping']}) is not supported; Gemma 3 checkpoints do not use it"
        )
    if arch.extra.get("use_bidirectional_attention"):
        raise ValueError(
            f"{arch.architecture}: bidirectional attention (use_bidirectional_attention=True, EmbeddingGemma) "
            "is not supported by the causal model"
        )
    if arch.mlp_bias:
        raise ValueError(f"{arch.architecture}: MLP biases (mlp_bias=True) are not supported")
