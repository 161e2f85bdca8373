"""Phi-3 GGUF files, written as llama.cpp would (fused attn_qkv and ffn_up = [gate | up], the rotary dimension,
the sliding window, LongRoPE factor tensors), through ``tidellm.LLM``: greedy tokens identical to transformers
fp32 and logprobs within 1e-3, alone and batched with chunked prefill and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch
import transformers
from parity_utils import check_gguf_file_parity

from tidellm.model_executor.loader.gguf_arch import arch_from_gguf
from tidellm.model_executor.loader.gguf_file import GGUFFile

MAX_NEW = 10
HEAD_DIM = 16
CASES = {
    "window": {"sliding_window": 12},
    # LongRoPE crossing its original length inside the prompts, on 3/4 of each head (Phi-4-mini style).
    "partial_longrope": {
        "original_max_position_embeddings": 16,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.25 * i for i in range(6)],
            "long_factor": [2.0 + 0.5 * i for i in range(6)],
            "original_max_position_embeddings": 16,
        },
    },  # fmt: skip
}


def _tiny_phi3(vocab: int, case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, **CASES[case],
    )  # fmt: skip
    model = transformers.Phi3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p)
            )
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_phi3_through_llm_matches_transformers(tmp_path, hf_gguf_writer, tiny_model, case):
    vocab = tiny_model("llama").config.vocab_size  # the byte vocabulary the GGUF tokenizer carries
    hf = _tiny_phi3(vocab, case)
    path = hf_gguf_writer(hf, tmp_path / f"phi3-{case}.gguf", "phi3")
    arch = arch_from_gguf(GGUFFile(path))
    assert arch.model_type == "phi3"
    if case == "window":
        assert arch.sliding_window == 12 and arch.rope_scaling is None
    else:
        rope = arch.rope_scaling
        assert rope["rope_type"] == "longrope" and rope["partial_rotary_factor"] == 0.75
        assert rope["original_max_position_embeddings"] == 16 and rope["long_factor"][1] == 2.5
    # Prompts within LongRoPE's original 16 positions, generation past them: compared with a KV-cached
    # transformers loop (its generate re-encodes the whole sequence with the long factors; README, RoPE).
    check_gguf_file_parity(hf, path, vocab, (5, 16, 11), MAX_NEW, tmp_path / "cache")
