"""GGUF tensors -> Hugging Face-named float tensors, one at a time.

Three things undo llama.cpp's conversion so that models see exactly what a transformers checkpoint holds:
names (``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj``), the row permutation of attn_q/attn_k that
llama.cpp applies for the ``llama`` architecture only, and Gemma's norm weights, which llama.cpp stores as
``1 + w`` (convert_hf_to_gguf adds the one so its kernels can multiply by the weight directly) while HF's
Gemma3RMSNorm multiplies by ``1 + w``: we subtract the one again and return HF-convention values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tidellm.config.arch import ArchConfig
from tidellm.model_executor.loader.dequant import BLOCK_DEQUANTIZERS
from tidellm.model_executor.loader.errors import ModelLoadError
from tidellm.model_executor.loader.gguf_file import GGUFFile, GGUFTensorInfo

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are made: the API process opens a GGUF source for its tokenizer and
# architecture only, and importing torch there (~0.7 s) would slow every server start.

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED_GGUF_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip
# Dequantize at most this many elements at once: bounds the numpy temporaries for a 262k-row embedding.
_CHUNK_ELEMENTS = 1 << 22

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 norms around both sub-blocks: llama.cpp's ffn_norm is the *pre*-feed-forward norm there.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE): the router, the shared expert and its gate.
# The routed experts come stacked, one tensor per kind (``_EXPERT_KINDS``), and are split per expert.
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERT_KINDS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_MOE_FAMILIES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
# Phi-3 keeps q/k/v and gate/up fused, as its HF checkpoints do (models/phi3.py splits them).
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Tensors that are not parameters of the HF model (llama.cpp's precomputed RoPE factors).
# Phi-3's LongRoPE factors are read into ArchConfig.rope_scaling instead (gguf_arch).
_SKIPPED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def hf_name(gguf_name: str, family: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, or None if it has no counterpart. Stacked
    experts get the name pattern ``model.layers.N.mlp.experts.{}.gate_proj.weight`` (``{}``: the expert)."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, base, kind = m.groups()
        table = {"gemma3": _GEMMA3_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES}.get(family, _LAYER_NAMES)
        if family in _MOE_FAMILIES:
            if base in _EXPERT_KINDS:
                return f"model.layers.{layer}.mlp.experts.{{}}.{_EXPERT_KINDS[base]}.{kind}"
            table = {**table, **_MOE_NAMES}
        return f"model.layers.{layer}.{table[base]}.{kind}" if base in table else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def check_supported_types(gguf: GGUFFile) -> None:
    """Fail before loading anything if a tensor uses a type we cannot dequantize."""
    bad = sorted({t.qtype.name for t in gguf.tensors.values() if t.qtype not in SUPPORTED_GGUF_TYPES})
    if bad:
        raise ModelLoadError(
            f"GGUF file {gguf.path} uses quantization type(s) {', '.join(bad)}, which tidellm cannot read. "
            f"Supported: {', '.join(t.name for t in SUPPORTED_GGUF_TYPES)}. Use a file quantized to one of "
            "these (e.g. Q4_K_M, Q8_0 or F16)."
        )


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes ``[..., row_bytes]`` -> a CPU tensor of ``shape``.

    F16/BF16 stay in their dtype (like a safetensors checkpoint); everything else becomes float32.
    """
    import torch

    if qtype == Q.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if qtype == Q.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape).copy())
    if qtype == Q.BF16:
        return torch.from_numpy(raw.view(np.int16).reshape(shape).copy()).view(torch.bfloat16)
    if qtype not in SUPPORTED_GGUF_TYPES:
        raise ModelLoadError(
            f"Quantization type {qtype.name} is not supported. Supported: "
            f"{', '.join(t.name for t in SUPPORTED_GGUF_TYPES)}."
        )
    type_size = GGML_QUANT_SIZES[qtype][1]
    fn = BLOCK_DEQUANTIZERS[qtype]
    cols = shape[-1] if shape else 1
    rows_raw = raw.reshape(-1, raw.shape[-1])  # [rows, row_bytes]
    out = np.empty((rows_raw.shape[0], cols), dtype=np.float32)  # [rows, cols]
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows_raw.shape[0], step):
        chunk = rows_raw[start : start + step]
        out[start : start + step] = fn(chunk.reshape(-1, type_size)).reshape(chunk.shape[0], cols)
    return torch.from_numpy(out.reshape(shape))


def _is_stacked(name: str) -> bool:
    return "{}" in name


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of attn_q/attn_k rows (``llama`` arch only)."""
    rows = w.shape[0]
    tail = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


class GGUFWeights:
    """Streams a GGUF file's tensors as (HF name, tensor), dequantized one at a time."""

    def __init__(self, gguf: GGUFFile, arch: ArchConfig) -> None:
        self.gguf = gguf
        self.arch = arch
        self.family = arch.model_type
        check_supported_types(gguf)
        self._plan: list[tuple[str, GGUFTensorInfo]] = []
        for info in gguf.tensors.values():
            name = hf_name(info.name, self.family)
            if name is None:
                if info.name not in _SKIPPED:
                    logger.warning("Skipping GGUF tensor %s: no Hugging Face counterpart", info.name)
                continue
            self._plan.append((name, info))

    def num_params(self) -> int:
        return sum(info.num_elements for _, info in self._plan)

    def names(self) -> list[str]:
        out = []
        for name, info in self._plan:
            if _is_stacked(name):
                out.extend(name.format(e) for e in range(info.shape[0]))
            else:
                out.append(name)
        return out

    def gguf_types(self) -> dict[str, GGMLQuantizationType]:
        """HF name -> the tensor's GGUF type (what ``keep_blocks`` can keep), stacked experts one by one."""
        out = {}
        for name, info in self._plan:
            for n in [name.format(e) for e in range(info.shape[0])] if _is_stacked(name) else [name]:
                out[n] = info.qtype
        return out

    def iter_weights(self, keep_blocks: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Dense tensors, except the names in ``keep_blocks`` whose type converts exactly to a block format:
        those come as ``QuantizedTensor`` without being widened. Stacked experts come one expert at a time."""
        from tidellm.model_executor.quant.blocks import EXACT_GGUF_FORMATS, QuantizedTensor

        for name, info in self._plan:
            if _is_stacked(name):
                experts = [name.format(e) for e in range(info.shape[0])]
                if info.qtype in EXACT_GGUF_FORMATS and all(n in keep_blocks for n in experts):
                    raw = self.gguf.raw(info)  # [E, rows, row_bytes]
                    for e, n in enumerate(experts):
                        yield n, QuantizedTensor.from_gguf(raw[e], info.qtype, info.shape[1:])
                    continue
                stacked = self.load(name, info)  # [E, out, in]
                for e, n in enumerate(experts):
                    yield n, stacked[e]
                continue
            yield name, self.load(name, info, name in keep_blocks and info.qtype in EXACT_GGUF_FORMATS)

    def load(self, name: str, info: GGUFTensorInfo, as_blocks: bool = False):
        import torch

        from tidellm.model_executor.quant.blocks import QuantizedTensor

        raw = self.gguf.raw(info)
        if as_blocks:
            w = QuantizedTensor.from_gguf(raw, info.qtype, info.shape)
        else:
            w = dequantize(raw, info.qtype, info.shape)
        if name.endswith("mlp.shared_expert_gate.weight") and w.dim() == 1:
            w = w.unsqueeze(0)  # llama.cpp stores Qwen2-MoE's one-row gate as a vector
        if self.arch.extra.get("gguf_architecture") == "llama":  # llama.cpp permuted q/k rows (Mixtral too)
            heads = None
            if ".self_attn.q_proj." in name:
                heads = self.arch.num_attention_heads
            elif ".self_attn.k_proj." in name:
                heads = self.arch.num_key_value_heads
            if heads is not None:
                if as_blocks:  # the same row order, applied to the blocks' rows
                    w = w.rows(unpermute_rows(torch.arange(info.shape[0]), heads))
                else:
                    w = unpermute_rows(w, heads)
        if self.family == "gemma3" and name.endswith("norm.weight"):
            w = (w.float() - 1.0).to(w.dtype)
        return w
