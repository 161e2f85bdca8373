"""Qwen2 and Qwen3 from GGUF files written as llama.cpp would (no q/k permutation; Qwen3's attn_q_norm /
attn_k_norm), through ``tidellm.LLM``: greedy tokens identical to transformers fp32 and logprobs within 1e-3,
each prompt alone and batched, with chunked prefill and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch
import transformers
from parity_utils import check_gguf_file_parity

MAX_NEW = 12


def _tiny_qwen3(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_gguf_qwen_through_llm_matches_transformers(tmp_path, tiny_model, hf_gguf_writer, family):
    vocab = tiny_model("llama").config.vocab_size  # the byte vocabulary the GGUF tokenizer carries
    hf = tiny_model("qwen2") if family == "qwen2" else _tiny_qwen3(vocab)
    path = hf_gguf_writer(hf, tmp_path / f"{family}.gguf", family)
    check_gguf_file_parity(hf, path, vocab, (5, 19, 11), MAX_NEW, tmp_path / "cache")
