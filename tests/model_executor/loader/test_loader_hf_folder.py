"""Hugging Face folders: v4 and v5 config layouts, single and sharded safetensors, weights equal to what
transformers saved, and repo ids served from a (fake) local HF cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tidellm.model_executor.loader import ModelLoadError, load_model_source
from tidellm.model_executor.loader.hf_config import arch_from_hf_config


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("shard", [None, "30KB"])
def test_folder_layouts(tmp_path, make_hf_folder, layout, shard):
    folder = make_hf_folder(
        tmp_path / "m",
        layout=layout,
        max_shard_size=shard,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    assert (folder / "model.safetensors.index.json").exists() == (shard is not None)
    source = load_model_source(str(folder))
    arch = source.arch
    assert source.format == "safetensors" and source.path == folder
    assert (arch.architecture, arch.model_type, arch.vocab_size, arch.hidden_size) == (
        "LlamaForCausalLM",
        "llama",
        265,
        64,
    )
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.num_hidden_layers) == (
        4,
        2,
        16,
        2,
    )
    assert arch.rope_theta == 5000.0
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert arch.checkpoint_dtype == "float32"
    assert arch.eos_token_id == [2, 0] and arch.bos_token_id == 1
    assert not arch.tie_word_embeddings
    saved = _saved_tensors(folder)
    got = dict(source.iter_weights())
    assert set(got) == set(saved) and "lm_head.weight" in got
    for name, w in got.items():
        assert torch.equal(w, saved[name]), name
    assert source.num_params() == sum(t.numel() for t in saved.values())
    tok = source.tokenizer
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, [2, 0])
    assert tok.encode(" the world") == tok.encode(
        " the world", add_special_tokens=False
    )  # add_bos_token false
    assert "shards" in source.description if shard else "safetensors float32" in source.description


def test_bf16_checkpoint_streams_bf16(tmp_path, make_hf_folder):
    folder = make_hf_folder(tmp_path / "bf", dtype=torch.bfloat16)
    source = load_model_source(str(folder))
    assert source.arch.checkpoint_dtype == "bfloat16"
    assert all(w.dtype == torch.bfloat16 for _, w in source.iter_weights())


def test_tied_embeddings_without_lm_head(tmp_path, make_hf_folder):
    folder = make_hf_folder(tmp_path / "tied", tie_word_embeddings=True)
    source = load_model_source(str(folder))
    assert source.arch.tie_word_embeddings
    assert "lm_head.weight" not in dict(source.iter_weights())


def test_head_dim_defaults_and_eos_int(tmp_path):
    cfg = {
        "model_type": "mistral", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 8, "head_dim": None, "eos_token_id": 2, "sliding_window": 4096, "torch_dtype": "bfloat16",
    }  # fmt: skip
    arch = arch_from_hf_config(cfg, tmp_path)
    assert arch.architecture == "MistralForCausalLM"  # no "architectures" key: from the family
    assert (arch.head_dim, arch.num_key_value_heads, arch.eos_token_id) == (8, 8, [2])
    assert arch.sliding_window == 4096 and arch.rope_scaling is None and arch.checkpoint_dtype == "bfloat16"


def test_qwen2_and_qwen3_defaults(tmp_path):
    base = {
        "vocab_size": 10,
        "hidden_size": 32,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    q2 = arch_from_hf_config(
        {**base, "model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, tmp_path
    )
    assert q2.attention_bias and q2.sliding_window is None and not q2.qk_norm
    q3 = arch_from_hf_config({**base, "model_type": "qwen3", "head_dim": 16, "rope_theta": 1e6}, tmp_path)
    assert q3.qk_norm and not q3.attention_bias and q3.head_dim == 16 and q3.rope_theta == 1e6


def test_gemma3_v5_rope_per_layer_type(tmp_path):
    cfg = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 32,
        "intermediate_size": 8, "num_hidden_layers": 6, "num_attention_heads": 2, "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512, "query_pre_attn_scalar": 16,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }  # fmt: skip
    arch = arch_from_hf_config(cfg, tmp_path)
    assert (arch.model_type, arch.rope_theta, arch.rope_scaling, arch.sliding_window) == (
        "gemma3",
        1e6,
        None,
        512,
    )
    assert arch.extra["rope_local_base_freq"] == 1e4 and arch.extra["query_pre_attn_scalar"] == 16
    assert arch.tie_word_embeddings and arch.qk_norm and arch.hidden_act == "gelu_pytorch_tanh"
    v4 = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
    }
    arch4 = arch_from_hf_config(v4, tmp_path)
    assert (arch4.rope_theta, arch4.extra["rope_local_base_freq"]) == (1e6, 1e4)


def test_multimodal_gemma3_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="gemma3_text"):
        arch_from_hf_config({"model_type": "gemma3", "text_config": {}}, tmp_path)


def test_bert_config(tmp_path):
    cfg = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
        "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 512,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "type_vocab_size": 2, "pad_token_id": 0,
    }  # fmt: skip
    arch = arch_from_hf_config(cfg, tmp_path)
    assert (arch.architecture, arch.head_dim, arch.rms_norm_eps, arch.hidden_act) == (
        "BertModel",
        32,
        1e-12,
        "gelu",
    )
    assert arch.extra["type_vocab_size"] == 2


def test_invalid_config_value(tmp_path):
    with pytest.raises(ModelLoadError, match="missing or has an invalid value for 'hidden_size'"):
        arch_from_hf_config({"model_type": "llama"}, tmp_path)


# ---------------------------------------------------------------- Hugging Face repo ids (offline)
def _fake_hub(hub, repo_id, folder, revision_hash="0123456789abcdef0123456789abcdef01234567"):
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision_hash
    snap.parent.mkdir(parents=True)
    folder.rename(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision_hash)
    return snap


def test_repo_id_from_local_hf_cache(tmp_path, make_hf_folder, monkeypatch):
    hub = tmp_path / "hub"
    snap = _fake_hub(hub, "tiny-org/tiny-llama", make_hf_folder(tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    source = load_model_source("tiny-org/tiny-llama")
    assert source.path == snap and source.arch.model_type == "llama"
    assert source.description.startswith("tiny-org/tiny-llama: safetensors")
    assert load_model_source("tiny-org/tiny-llama", revision="main").path == snap


def test_repo_id_not_cached_is_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError) as e:
        load_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "unreachable" in msg
    assert "HF_HOME" in msg and "local path" in msg and "smollm2-135m" in msg


def test_tokenizer_config_variants(tmp_path, make_hf_folder):
    folder = make_hf_folder(tmp_path / "tc", layout="v4")
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_model_source(str(folder)).tokenizer.chat_template == "DEFAULT"
