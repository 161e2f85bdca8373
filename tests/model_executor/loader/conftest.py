"""Builders for the loader tests: tiny GGUF files written with ``gguf.GGUFWriter`` and tiny transformers
models, so that every format path is exercised in milliseconds without the real models.

Helpers are handed out as fixtures (test modules here are not a package and cannot import each other).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE vocabulary: 256 byte symbols, a few merges, ChatML specials (control)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = list(SPECIALS) + [alphabet[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]],
    *,
    with_tokenizer: bool = True,
) -> Path:
    """Write a GGUF file; float tensors are quantized to the given type with ``gguf.quants.quantize``."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        full = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        elif isinstance(value, str):
            writer.add_string(full, value)
        else:
            writer.add_array(full, value)
    if with_tokenizer:
        tokens, types, merges = byte_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        )
    for name, array, qtype in tensors:
        array = np.ascontiguousarray(array)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor(name, array.astype(dtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf's ``permute``), written out for the round trip."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_TO_GGUF_LLAMA = {**_TO_GGUF, "post_attention_layernorm": "ffn_norm"}
_TO_GGUF_GEMMA3 = {
    **_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


_TO_GGUF_MOE = {
    **_TO_GGUF_LLAMA,
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


_TO_GGUF_PHI3 = {**_TO_GGUF_LLAMA, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _stacked_experts(name: str, w: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """transformers v5's stacked experts -> llama.cpp's ffn_{gate,up,down}_exps ([E, out, in] each)."""
    layer = name.split(".")[2]
    if name.endswith("gate_up_proj"):
        gate, up = np.split(w, 2, axis=1)
        return [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
    return [(f"blk.{layer}.ffn_down_exps.weight", w)]


def hf_to_gguf(
    model: torch.nn.Module,
    path: Path,
    arch: str,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> Path:
    """Write a transformers decoder as llama.cpp would: names, q/k permutation (llama), 1 + w norms (gemma3),
    stacked experts and their keys (MoE: qwen2moe, qwen3moe, or llama for Mixtral)."""
    cfg = model.config
    moe = hasattr(cfg, "num_experts_per_tok")
    table = {"gemma3": _TO_GGUF_GEMMA3, "phi3": _TO_GGUF_PHI3}.get(
        arch, _TO_GGUF_MOE if moe else _TO_GGUF_LLAMA
    )
    tensors = []
    for name, value in model.state_dict().items():
        w = value.float().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".mlp.experts." in name:
            tensors += [(n, x, qtype) for n, x in _stacked_experts(name, w)]
            continue
        if name.endswith("shared_expert_gate.weight"):
            w = w.reshape(-1)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            base, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{table[base]}.{kind}"
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
            }.get(name, "output.weight")
        if arch == "llama" and base_is(gname, "attn_q"):
            w = permute_rows(w, cfg.num_attention_heads)
        if arch == "llama" and base_is(gname, "attn_k"):
            w = permute_rows(w, cfg.num_key_value_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            w = w + 1.0
        tensors.append((gname, w, qtype if w.ndim == 2 else gguf.GGMLQuantizationType.F32))
    meta: dict[str, Any] = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.freq_base": float(cfg.rope_parameters.get("rope_theta") if arch != "gemma3" else 1e6),
        "attention.key_length": head_dim(cfg),
        "attention.value_length": head_dim(cfg),
    }
    if arch == "gemma3":
        meta["attention.sliding_window"] = cfg.sliding_window
    if arch == "phi3":
        _phi3_meta(cfg, meta, tensors)
    if moe:
        meta["expert_count"] = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        meta["expert_used_count"] = cfg.num_experts_per_tok
        if hasattr(cfg, "moe_intermediate_size"):
            meta["expert_feed_forward_length"] = cfg.moe_intermediate_size
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            meta["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    return write_gguf(path, arch, meta, tensors)


def _phi3_meta(cfg: Any, meta: dict[str, Any], tensors: list) -> None:
    """What convert_hf_to_gguf writes for Phi-3: the rotary dimension, the window, LongRoPE factors."""
    rope = dict(cfg.rope_parameters)
    meta["rope.dimension_count"] = int(head_dim(cfg) * rope.get("partial_rotary_factor", 1.0))
    if cfg.sliding_window:
        meta["attention.sliding_window"] = cfg.sliding_window
    if rope.get("rope_type") == "longrope":
        f32 = gguf.GGMLQuantizationType.F32
        tensors.append(("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32), f32))
        tensors.append(("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32), f32))
        meta["rope.scaling.original_context_length"] = cfg.original_max_position_embeddings


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def base_is(gguf_name: str, base: str) -> bool:
    return gguf_name.split(".")[2] == base if gguf_name.startswith("blk.") else False


def tiny_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random transformers decoder whose vocabulary matches ``byte_vocab``; every parameter random
    (Gemma initialises its norms to zero, which would hide a wrong 1 + w offset)."""
    import transformers

    torch.manual_seed(seed)
    vocab = len(byte_vocab()[0])
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=5000.0))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False)
        )
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **{**common, "num_key_value_heads": 1}, head_dim=32, sliding_window=16, query_pre_attn_scalar=32
        )
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def gguf_writer() -> Callable[..., Path]:
    return write_gguf


@pytest.fixture
def hf_gguf_writer() -> Callable[..., Path]:
    return hf_to_gguf


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    return tiny_hf_model


@pytest.fixture
def cfg_head_dim() -> Callable[[Any], int]:
    return head_dim


@pytest.fixture
def permute() -> Callable[[np.ndarray, int], np.ndarray]:
    return permute_rows


def byte_level_tokenizer_json(path: Path) -> None:
    """tokenizer.json for ``byte_vocab``, built directly with ``tokenizers`` (no post-processor)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, _, merges = byte_vocab()
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(path))


def v5_to_v4(folder: Path) -> None:
    """Rewrite a transformers v5 folder the way v4 wrote it: torch_dtype, top-level rope_theta/rope_scaling,
    the chat template inside tokenizer_config.json."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    template = folder / "chat_template.jinja"
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = template.read_text()
    template.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def make_hf_folder_impl(
    folder: Path,
    *,
    max_shard_size: str | None = None,
    layout: str = "v5",
    dtype: torch.dtype = torch.float32,
    **cfg_kw: Any,
) -> Path:
    """A tiny random Llama saved by transformers, with tokenizer files; returns the folder."""
    import json

    import transformers

    torch.manual_seed(0)
    vocab = len(byte_vocab()[0])
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=[2, 0],
        rope_theta=5000.0, tie_word_embeddings=False,
    )  # fmt: skip
    kw.update(cfg_kw)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(dtype)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kw)
    byte_level_tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False})
    )
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    if layout == "v4":
        v5_to_v4(folder)
    return folder


@pytest.fixture
def make_hf_folder() -> Callable[..., Path]:
    return make_hf_folder_impl
