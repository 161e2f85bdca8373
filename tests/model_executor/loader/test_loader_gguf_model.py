"""GGUF round trips: tiny transformers models written as llama.cpp would (names, permuted q/k for llama,
1 + w norms for Gemma 3) come back through ``load_model_source`` with HF names and HF values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tidellm.model_executor.loader import load_model_source
from tidellm.model_executor.loader.gguf_weights import unpermute_rows

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_round_trip_exact(tmp_path, tiny_model, hf_gguf_writer, family):
    model = tiny_model(family)
    path = hf_gguf_writer(model, tmp_path / f"{family}.gguf", family)
    source = load_model_source(str(path), cache_dir=str(tmp_path / "cache"))
    assert source.format == "gguf" and source.path == path
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = dict(source.iter_weights())
    assert set(got) == set(expected)
    for name, w in got.items():
        assert w.dtype == torch.float32 and w.device.type == "cpu", name
        torch.testing.assert_close(w, expected[name], rtol=0, atol=1e-6, msg=name)
    assert source.num_params() == sum(v.numel() for v in expected.values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_arch_config_from_metadata(tmp_path, tiny_model, hf_gguf_writer, cfg_head_dim, family):
    model = tiny_model(family)
    cfg = model.config
    arch = load_model_source(
        str(hf_gguf_writer(model, tmp_path / "m.gguf", family)), cache_dir=str(tmp_path)
    ).arch
    assert arch.model_type == family
    assert (
        arch.architecture
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]
    )
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
    )
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg_head_dim(cfg),
    )
    assert arch.rms_norm_eps == cfg.rms_norm_eps
    assert arch.max_position_embeddings == cfg.max_position_embeddings
    assert arch.tie_word_embeddings == cfg.tie_word_embeddings
    assert arch.attention_bias == (family == "qwen2")
    assert arch.qk_norm == (family == "gemma3")
    assert arch.bos_token_id == 1 and arch.eos_token_id[0] == 2
    if family == "gemma3":
        assert arch.sliding_window == cfg.sliding_window
        assert arch.hidden_act == "gelu_pytorch_tanh"
        assert arch.extra["layer_types"] == cfg.layer_types
        assert arch.extra["rope_local_base_freq"] == 10000.0
        assert arch.extra["query_pre_attn_scalar"] == cfg.query_pre_attn_scalar
    else:
        assert arch.rope_theta == cfg.rope_parameters["rope_theta"]
        assert arch.sliding_window is None


def test_round_trip_quantized_q8_0(tmp_path, tiny_model, hf_gguf_writer):
    model = tiny_model("llama")
    path = hf_gguf_writer(model, tmp_path / "q8.gguf", "llama", Q.Q8_0)
    expected = model.state_dict()
    for name, w in load_model_source(str(path), cache_dir=str(tmp_path)).iter_weights():
        ref = expected[name]
        # Q8_0: per-32 block scale amax/127, so the error is at most half a step of the block's largest value.
        tol = ref.abs().max().item() / 127 * 0.6 if ref.ndim == 2 else 1e-6
        torch.testing.assert_close(w, ref, rtol=0, atol=tol, msg=name)


def test_unpermute_inverts_llama_cpp_permutation(permute):
    rng = np.random.default_rng(0)
    for n_head, rows, cols in [(4, 64, 8), (3, 192, 5), (1, 8, 1)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        back = unpermute_rows(torch.from_numpy(permute(w, n_head)), n_head)
        assert torch.equal(back, torch.from_numpy(w))
    bias = rng.standard_normal(64).astype(np.float32)  # 1-D tensors (q/k biases) too
    assert torch.equal(unpermute_rows(torch.from_numpy(permute(bias, 4)), 4), torch.from_numpy(bias))


def test_tokenizer_and_template_from_metadata(tmp_path, tiny_model, hf_gguf_writer):
    source = load_model_source(
        str(hf_gguf_writer(tiny_model("llama"), tmp_path / "t.gguf", "llama")), cache_dir=str(tmp_path)
    )
    tok = source.tokenizer
    ids = tok.encode("<|im_start|> the world", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "Ġthe", "Ġw", "or", "l", "d"]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|> the world"
    assert tok.decode(ids) == " the world"
    assert tok.eos_token_id == 2 and 2 in tok.eos_token_ids and tok.bos_token_id == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"


def test_gemma3_gguf_model_matches_transformers(tmp_path, tiny_model, hf_gguf_writer):
    """The GGUF path end to end: llama.cpp's names and 1 + w norms, the window and layer pattern from the
    metadata, through our Gemma3 model, give transformers' logits (24 tokens, window 16, two chunks)."""
    from tidellm.model_executor.forward_context import set_forward_context
    from tidellm.model_executor.layers.attention import AttentionMetadata
    from tidellm.model_executor.models.kv_cache import allocate_kv_caches
    from tidellm.model_executor.models.registry import get_model_class

    hf = tiny_model("gemma3")
    path = hf_gguf_writer(hf, tmp_path / "g.gguf", "gemma3")
    source = load_model_source(str(path), cache_dir=str(tmp_path / "cache"))
    arch = source.arch
    model = get_model_class(arch)(arch)
    model.load_weights(source.iter_weights())
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [16, 16]
    kv = allocate_kv_caches(arch, 8, 4, torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, arch.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    table = np.array([[5, 3, 7, 0, 2, 6]])
    logits = []
    for start, end in ((0, 10), (10, 24)):
        pos = np.arange(start, end)
        meta = AttentionMetadata.build(
            query_start_loc=np.array([0, end - start]), seq_lens=np.array([end]), block_table=table,
            slot_mapping=table[0][pos // 4] * 4 + pos % 4, block_size=4, device=torch.device("cpu"),
        )  # fmt: skip
        with torch.no_grad(), set_forward_context(meta, kv):
            logits.append(model.compute_logits(model(tokens[start:end], torch.from_numpy(pos))))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
    torch.testing.assert_close(torch.cat(logits), ref, atol=1e-4, rtol=1e-4)
