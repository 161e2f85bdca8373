"""Llama (and Mistral, Qwen2/3 and Phi-3 by flags, see qwen2.py and phi3.py) over a paged KV cache.

Reads like Hugging Face's ``modeling_llama``: embed -> decoder layers (input_layernorm, self_attn,
post_attention_layernorm, mlp) -> norm -> lm_head. Differences from it are for speed only: q/k/v and
gate/up are one matmul each, rotary cos/sin are looked up once per forward, and the residual add is folded
into the next norm.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch
from torch import nn

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.layers.activation import SiluAndMul
from tidellm.model_executor.layers.attention import Attention
from tidellm.model_executor.layers.embedding import LMHead, VocabEmbedding
from tidellm.model_executor.layers.linear import Linear, MergedColumnLinear, QKVLinear
from tidellm.model_executor.layers.norm import RMSNorm
from tidellm.model_executor.layers.rotary import RotaryEmbedding, rotate_owned
from tidellm.model_executor.layers.weight_utils import load_named_weights
from tidellm.model_executor.models.fused_layers import FusedLayers

RotaryCosSin = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, head_dim / 2] each
MakeMLP = Callable[[int], nn.Module | None]  # layer index -> its MLP, None for the dense LlamaMLP

# (our parameter name fragment, checkpoint name fragment, shard id) for the merged projections.
STACKED_PARAMS: list[tuple[str, str, Hashable]] = [
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
]
# Families whose transformers attention applies the config's sliding_window in every layer (Mistral, Mixtral,
# Phi-3: e.g. Phi-3-mini-4k's window of 2047); Llama ignores the key, Qwen2 has per-layer rules.
SLIDES_EVERY_LAYER = frozenset({"mistral", "mixtral", "phi3"})
# Buffers some checkpoints carry that we recompute.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate) * up). ``act_fn`` (default SiLU) lets other families reuse it (Gemma: GeGLU)."""

    def __init__(
        self, arch: ArchConfig, dtype: torch.dtype, device: torch.device, act_fn: nn.Module | None = None
    ) -> None:
        super().__init__()
        if act_fn is None and arch.hidden_act != "silu":
            raise ValueError(f"LlamaForCausalLM supports hidden_act='silu' only (got {arch.hidden_act!r})")
        kw = dict(bias=arch.mlp_bias, dtype=dtype, device=device)
        self.gate_up_proj = MergedColumnLinear(arch.hidden_size, [arch.intermediate_size] * 2, **kw)
        self.act_fn = SiluAndMul() if act_fn is None else act_fn
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, H] -> [T, 2I] -> [T, I] -> [T, H]


class LlamaAttention(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: torch.device,
        o_proj_bias: bool | None = None,
    ) -> None:
        """``o_proj_bias`` None: o_proj has a bias when q/k/v do (llama); Qwen2 has q/k/v biases only."""
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj = QKVLinear(
            arch.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=arch.attention_bias, **kw
        )
        o_bias = arch.attention_bias if o_proj_bias is None else o_proj_bias
        self.o_proj = Linear(self.num_heads * self.head_dim, arch.hidden_size, bias=o_bias, **kw)
        # Qwen3: RMSNorm over each head's dimensions of q and of k, before RoPE.
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        # transformers slides every layer of these families; the others refuse a window (_check_supported).
        window = arch.sliding_window if arch.model_type in SLIDES_EVERY_LAYER else None
        self.attn = Attention(
            self.num_heads, self.head_dim, self.num_kv_heads, layer_idx, sliding_window=window
        )

    def forward(self, hidden: torch.Tensor, cos_sin: RotaryCosSin) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        q_size = self.num_heads * self.head_dim
        qk_size = q_size + self.num_kv_heads * self.head_dim
        if self.q_norm is None:
            # q and k are adjacent in the qkv output: rotate both in one pass.
            qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            qk = rotate_owned(qk, *cos_sin)  # [T, H + Hkv, D]
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = self.q_norm(qkv[:, :q_size].reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, q_size:qk_size].reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = rotate_owned(q, *cos_sin), rotate_owned(k, *cos_sin)  # [T, H, D], [T, Hkv, D]
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        return self.o_proj(self.attn(q, k, v))  # [T, H D] -> [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: torch.device,
        o_proj_bias: bool | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        """``mlp``: this layer's feed-forward block (default: the dense LlamaMLP)."""
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(arch, layer_idx, dtype, device, o_proj_bias)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = mlp if mlp is not None else LlamaMLP(arch, dtype, device)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: RotaryCosSin
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it); their sum is the HF hidden state."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        dtype: torch.dtype,
        device: torch.device,
        o_proj_bias: bool | None = None,
        make_mlp: MakeMLP | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, i, dtype, device, o_proj_bias, None if make_mlp is None else make_mlp(i))
            for i in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_context_len, arch.rope_theta, arch.rope_scaling, dtype, device,
            max_position_embeddings=arch.max_position_embeddings,
        )  # fmt: skip
        # Steps through one compiled call when the layers allow it (models/fused_layers.py); decided
        # on the first forward, once the weights are in place. False turns it off.
        self.fused_layers: FusedLayers | bool | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        cos_sin = self.rotary_emb(positions)
        if self.fused_layers is None:
            self.fused_layers = FusedLayers.build(self) or False
        fused = self.fused_layers.run(hidden, cos_sin) if self.fused_layers else None
        if fused is not None:
            hidden, residual = fused
        else:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(hidden, residual, cos_sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS  # read by the quantization swap to name each merged layer's shards
    o_proj_bias: bool | None = None  # family flag (see LlamaAttention); subclasses override

    def __init__(
        self,
        arch: ArchConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        make_mlp: MakeMLP | None = None,
    ) -> None:
        """``make_mlp(layer_idx)``: a layer's feed-forward block, or None for the dense one (MoE models)."""
        super().__init__()
        device = torch.device("cpu") if device is None else torch.device(device)
        _check_supported(arch)
        self.arch = arch
        self.model = LlamaModel(arch, dtype, device, self.o_proj_bias, make_mlp)
        tied = self.model.embed_tokens if arch.tie_word_embeddings else None
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype, device, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] (the step's flattened tokens) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, hidden] -> [N, vocab] fp32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors; raises ValueError naming every missing or unexpected weight."""
        params = dict(self.named_parameters())
        tied = self.lm_head.tied

        def rename(name: str) -> str | None:
            return None if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight") else name

        return load_named_weights(
            self.arch.architecture, params, _expected_shards(self, params), weights, STACKED_PARAMS, rename
        )


def _check_supported(arch: ArchConfig) -> None:
    """Refuse family features this class does not implement rather than compute something else."""
    windowed = arch.sliding_window is not None and arch.sliding_window < arch.max_context_len
    if windowed and arch.model_type not in SLIDES_EVERY_LAYER:
        raise ValueError(
            f"{arch.architecture}: sliding-window attention (sliding_window={arch.sliding_window}) is not "
            "supported yet"
        )


def _expected_shards(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[tuple[str, Hashable], str]:
    """(parameter name, shard id) -> checkpoint name, for every piece load_weights must see."""
    checkpoint_name = {(ours, shard): theirs for ours, theirs, shard in STACKED_PARAMS}
    ids = {id(p): n for n, p in params.items()}
    out: dict[tuple[str, Hashable], str] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            name = ids.get(id(param))
            if name is None or (name, None) in out:
                continue
            shards = getattr(module, "shard_offsets", None) or {None: None}
            for shard in shards:
                theirs = name
                for (ours, shard_id), frag in checkpoint_name.items():
                    if shard_id == shard and ours in name:
                        theirs = name.replace(ours, frag)
                out[(name, shard)] = theirs
    return out
