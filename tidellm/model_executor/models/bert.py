"""BERT-style encoders (``BertModel``, and ``RobertaModel`` / ``XLMRobertaModel``) for embeddings:
bidirectional attention, no KV cache.

Reads like Hugging Face's ``modeling_bert``: embeddings (word + absolute position + token type, LayerNorm)
-> encoder layers (self-attention, output dense + LayerNorm on the residual, GELU intermediate, output dense
+ LayerNorm) -> the last hidden state. The module names follow the checkpoint's, except that query, key and
value are one matmul (``attention.self.qkv_proj``). Requests arrive packed ([T] rows) with an
``EncoderMetadata`` saying where each one starts; pooling is the runner's job (``layers/pooler``). BERT's own
``pooler`` (dense + tanh over [CLS]) is not used by sentence embeddings and its weights are skipped.
RoBERTa and XLM-R are the same network whose position ids start after the padding id (``padding_idx + 1``):
their tables hold that many unused rows (514 for 512 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.layers.attention.encoder import EncoderMetadata, encoder_attention
from tidellm.model_executor.layers.embedding import VocabEmbedding
from tidellm.model_executor.layers.linear import Linear, QKVLinear
from tidellm.model_executor.layers.weight_utils import load_named_weights

# (our parameter name fragment, checkpoint name fragment, shard id) for the merged q/k/v projection.
STACKED_PARAMS: list[tuple[str, str, Hashable]] = [
    (".self.qkv_proj.", ".self.query.", "q"),
    (".self.qkv_proj.", ".self.key.", "k"),
    (".self.qkv_proj.", ".self.value.", "v"),
]
# Checkpoint tensors we do not use: BERT's [CLS] pooler, pre-training heads, index buffers older saves kept.
_SKIPPED_PREFIXES = ("pooler.", "cls.")
_SKIPPED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Families whose positions are numbered from pad_token_id + 1 (transformers' create_position_ids_from_input_ids).
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta"})


def position_offset(arch: ArchConfig) -> int:
    """The position id of an input's first token."""
    if arch.model_type in _OFFSET_POSITIONS:
        return int(arch.extra.get("pad_token_id", 1)) + 1
    return 0


def max_input_positions(arch: ArchConfig) -> int:
    """The longest input the position table allows."""
    return arch.max_position_embeddings - position_offset(arch)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _layer_norm(arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> nn.LayerNorm:
    eps = float(arch.extra.get("layer_norm_eps", arch.rms_norm_eps))
    norm = nn.LayerNorm(arch.hidden_size, eps=eps, dtype=dtype, device=device)
    norm.requires_grad_(False)
    return norm


class BertEmbeddings(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h = arch.hidden_size
        type_vocab = int(arch.extra.get("type_vocab_size", 2))
        self.word_embeddings = VocabEmbedding(arch.vocab_size, h, dtype, device)
        self.position_embeddings = nn.Embedding(arch.max_position_embeddings, h, dtype=dtype, device=device)
        self.token_type_embeddings = nn.Embedding(type_vocab, h, dtype=dtype, device=device)
        self.LayerNorm = _layer_norm(arch, dtype, device)
        for emb in (self.position_embeddings, self.token_type_embeddings):
            emb.requires_grad_(False)
        self.position_offset = position_offset(arch)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        if self.position_offset:
            positions = positions + self.position_offset
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [T, H]
        if token_type_ids is None:
            x += self.token_type_embeddings.weight[0]  # single-segment input: type 0 everywhere
        else:
            x += self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.head_dim = arch.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVLinear(
            arch.hidden_size,
            self.head_dim,
            self.num_heads,
            self.num_heads,
            bias=True,
            dtype=dtype,
            device=device,
        )

    def forward(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).view(t, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, D] each
        return encoder_attention(q, k, v, meta, self.scale)  # [T, H D]


class BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``attention.output`` and ``output`` blocks."""

    def __init__(self, arch: ArchConfig, in_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dense = Linear(in_size, arch.hidden_size, bias=True, dtype=dtype, device=device)
        self.LayerNorm = _layer_norm(arch, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.self = BertSelfAttention(arch, dtype, device)
        self.output = BertDenseNorm(arch, arch.hidden_size, dtype, device)

    def forward(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        return self.output(self.self(hidden, meta), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dense = Linear(arch.hidden_size, arch.intermediate_size, bias=True, dtype=dtype, device=device)
        self.act_fn = _ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(x))  # [T, H] -> [T, I]


class BertLayer(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.attention = BertAttention(arch, dtype, device)
        self.intermediate = BertIntermediate(arch, dtype, device)
        self.output = BertDenseNorm(arch, arch.intermediate_size, dtype, device)

    def forward(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        attn = self.attention(hidden, meta)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(arch, dtype, device) for _ in range(arch.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, meta)
        return hidden


class BertModel(nn.Module):
    stacked_params = STACKED_PARAMS  # read by the quantization swap to name each merged layer's shards

    def __init__(
        self, arch: ArchConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> None:
        super().__init__()
        device = torch.device("cpu") if device is None else torch.device(device)
        _check_supported(arch)
        self.arch = arch
        self.embeddings = BertEmbeddings(arch, dtype, device)
        self.encoder = BertEncoder(arch, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: EncoderMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] (requests packed as ``meta`` says) -> last hidden states [T, hidden]."""
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids), meta)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors (with or without the ``bert.`` prefix of task checkpoints);
        raises ValueError naming every missing or unexpected weight."""
        params = dict(self.named_parameters())

        def rename(name: str) -> str | None:
            name = _normalize_name(name)
            return None if name.startswith(_SKIPPED_PREFIXES) or name.endswith(_SKIPPED_SUFFIXES) else name

        return load_named_weights(
            self.arch.architecture, params, _expected(params), weights, STACKED_PARAMS, rename
        )


def _normalize_name(name: str) -> str:
    """``bert.encoder...`` (or ``roberta.``) -> ``encoder...``; old TensorFlow-converted LayerNorm
    ``gamma``/``beta`` names."""
    name = name.removeprefix("bert.").removeprefix("roberta.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def _expected(params: dict[str, nn.Parameter]) -> dict[tuple[str, Hashable], str]:
    """(parameter name, shard id) -> checkpoint name, for every piece load_weights must see."""
    out: dict[tuple[str, Hashable], str] = {}
    for name in params:
        merged = [(theirs, shard) for ours, theirs, shard in STACKED_PARAMS if ours in name]
        if not merged:
            out[(name, None)] = name
        for theirs, shard in merged:
            out[(name, shard)] = name.replace(".self.qkv_proj.", theirs)
    return out


def _check_supported(arch: ArchConfig) -> None:
    """Refuse variants this class does not implement rather than compute something else."""
    kind = arch.extra.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(
            f"{arch.architecture}: position_embedding_type={kind!r} is not supported (absolute only)"
        )
    if arch.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"{arch.architecture}: hidden_act={arch.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    if arch.hidden_size % arch.num_attention_heads:
        raise ValueError(
            f"{arch.architecture}: hidden_size={arch.hidden_size} is not a multiple of "
            f"num_attention_heads={arch.num_attention_heads}"
        )
    if arch.extra.get("is_decoder") or arch.extra.get("add_cross_attention"):
        raise ValueError(f"{arch.architecture}: decoder / cross-attention BERT variants are not supported")
