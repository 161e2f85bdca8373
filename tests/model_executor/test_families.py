"""Qwen2, Qwen3, Phi-3 and the RoPE scaling types (linear, dynamic NTK, Llama 3, YaRN, LongRoPE) against
transformers in fp32, on tiny random models saved as safetensors folders.

Two levels: our paged model through the simulated engine of test_llama (logits of every chunk and decode
within 1e-4 of transformers' full-sequence forward: shuffled blocks, chunked prefill, a prefix-cache hit), and
the real engine ``tidellm.LLM(<folder>)`` against ``generate`` (greedy tokens identical and logprobs within
1e-3, each prompt alone, all in one batch, with chunked prefill and prefix-cache hits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from parity_utils import arch_of, cached_folders, check_outputs, hf_greedy, tiny_llm
from test_llama import DEVICES, _run_engine, randomize_

from tidellm import LLM, SamplingParams
from tidellm.model_executor.loader.hf_config import arch_from_hf_config
from tidellm.model_executor.models.registry import get_model_class

VOCAB = 256
EOS = VOCAB - 1
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)
LONGROPE_HEAD_DIM = COMMON["hidden_size"] // COMMON["num_attention_heads"]


def _longrope(original: int, partial: float = 1.0) -> dict[str, Any]:
    half = int(LONGROPE_HEAD_DIM * partial) // 2
    return {
        "partial_rotary_factor": partial,
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.25 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
        "original_max_position_embeddings": original,
    }


# case -> (transformers config class, config overrides)
CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": False}),
    "qwen2_tied": (transformers.Qwen2Config, {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32, "tie_word_embeddings": False}),
    "qwen3_bias_tied": (transformers.Qwen3Config, {"attention_bias": True, "tie_word_embeddings": True}),
    "phi3": (transformers.Phi3Config, {}),
    "qwen2_linear_rope": (
        transformers.Qwen2Config,
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    "llama_dynamic_rope": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}},
    ),
    "qwen2_llama3_rope": (
        transformers.Qwen2Config,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            }
        },
    ),
    "qwen2_yarn_rope": (
        transformers.Qwen2Config,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            }
        },
    ),
    "llama_yarn_mscale_rope": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "rope_theta": 10000.0,
            }
        },
    ),
    # Sequences within the original context: the short factors, and the attention factor for 128 / 64.
    # (Phi3Config's top-level original_max_position_embeddings overrides the one in rope_parameters.)
    "phi3_longrope": (
        transformers.Phi3Config,
        {"rope_parameters": _longrope(64), "original_max_position_embeddings": 64},
    ),
    # Generation crosses the original context (16): positions from 16 on use the long factors.
    "phi3_longrope_crossing": (
        transformers.Phi3Config,
        {"rope_parameters": _longrope(16), "original_max_position_embeddings": 16},
    ),
    # Phi-4-mini style: only the first part of each head is rotated.
    "phi3_partial_rotary": (
        transformers.Phi3Config,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
    ),
    "phi3_partial_longrope": (
        transformers.Phi3Config,
        {"rope_parameters": _longrope(64, partial=0.75), "original_max_position_embeddings": 64},
    ),
}
# Cases whose generation crosses the original context: a transformers forward over the whole sequence, and
# Phi-3's generate (which then re-encodes everything with the long factors), differ from decoding with a KV
# cache (see rotary.py); compared with a KV-cached transformers loop, on prompts within the original context.
CROSSING = {"phi3_longrope_crossing": 16}


def _hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, overrides = CASES[case]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **overrides})
    return randomize_(transformers.AutoModelForCausalLM.from_config(config))


def _write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (``t0`` .. ``t255``): enough for LLM(folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "t1", "eos_token": f"t{EOS}", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """case -> (transformers model, its safetensors folder), built once per case."""
    return cached_folders(tmp_path_factory, _hf_model, _write_tokenizer)


# ---------------------------------------------------------------- paged model vs full-sequence forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c not in CROSSING])
def test_paged_parity_fp32(case: str, device: str, family_folder) -> None:
    hf, folder = family_folder(case)
    arch = arch_of(folder)  # through the loader's config parsing, as the engine does
    assert arch.architecture == type(hf).__name__
    _run_engine(hf, torch.float32, device, atol=1e-4, arch=arch)


# ---------------------------------------------------------------- the real engine vs generate
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


def _prompts(max_len: int | None) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [3, 13, 30, 7, 21] if max_len is None else [3, 13, max_len, 7, max_len - 1]
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]
    prompts[4][:12] = prompts[2][:12]  # a shared prefix of three 4-token blocks
    return prompts


@pytest.mark.parametrize("case", list(CASES))
def test_llm_parity_fp32(case: str, family_folder) -> None:
    hf, folder = family_folder(case)
    prompts = _prompts(CROSSING.get(case))
    reference = hf_greedy(hf, prompts, MAX_NEW, [EOS], stepwise=case in CROSSING)
    # A step budget of 8 tokens chunks every prompt longer than that; 4-token blocks make short prefixes hit.
    llm = tiny_llm(folder)
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    hits_before = llm.engine.core.scheduler.kv.stats.hits
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.stats.hits > hits_before  # the alone runs left their blocks cached
    check_outputs(batched, reference)


# ---------------------------------------------------------------- loading and refusals
def test_phi3_fused_weights_split_and_checked(family_folder) -> None:
    hf, folder = family_folder("phi3")
    arch = arch_of(folder)
    model = get_model_class(arch)(arch)
    model.load_weights(hf.state_dict().items())
    attn, hf_attn = model.model.layers[1].self_attn, hf.model.layers[1].self_attn
    assert torch.equal(attn.qkv_proj.weight, hf_attn.qkv_proj.weight)
    assert torch.equal(
        model.model.layers[0].mlp.gate_up_proj.weight, hf.model.layers[0].mlp.gate_up_proj.weight
    )
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.qkv_proj.weight"] = torch.ones(100, 64)
    with pytest.raises(
        ValueError, match=r"qkv_proj\.weight.*\(100, 64\) has 100 rows, expected 128 \(64 \+ 32 \+ 32\)"
    ):
        get_model_class(arch)(arch).load_weights(weights.items())


def test_qwen2_has_no_o_proj_bias_and_qwen3_norms_heads(family_folder) -> None:
    _, folder = family_folder("qwen2")
    model = _fresh_from(folder)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None and attn.q_norm is None
    _, folder = family_folder("qwen3")
    attn = _fresh_from(folder).model.layers[0].self_attn
    assert attn.qkv_proj.bias is None and attn.q_norm.weight.shape == (32,)


def _fresh_from(folder: Path):
    arch = arch_of(folder)
    return get_model_class(arch)(arch)


def test_bad_rope_configs_refused(tmp_path) -> None:
    partial = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}
    config = transformers.Phi3Config(**COMMON).to_dict() | {"rope_parameters": partial}
    arch = arch_from_hf_config(config, tmp_path)
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0\.1 gives 1 rotary dimensions"):
        get_model_class(arch)(arch)
    bad = {**_longrope(64), "short_factor": [1.0, 2.0]}
    config = transformers.Phi3Config(**COMMON).to_dict() | {"rope_parameters": {**bad, "rope_theta": 1e4}}
    arch = arch_from_hf_config(config, tmp_path)
    with pytest.raises(ValueError, match="short_factor has 2 entries, expected the rotary dimension / 2 = 8"):
        get_model_class(arch)(arch)


def test_v4_phi3_config_top_level_original_context(tmp_path) -> None:
    """v4 Phi-3 configs keep original_max_position_embeddings at the top level and may say 'su'."""
    config = {
        **transformers.Phi3Config(**COMMON).to_dict(),
        "rope_parameters": None,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        "original_max_position_embeddings": 32,
    }
    arch = arch_from_hf_config(config, tmp_path)
    assert arch.rope_scaling["rope_type"] == "longrope"
    assert arch.rope_scaling["original_max_position_embeddings"] == 32
    rotary = get_model_class(arch)(arch).model.rotary_emb
    # attention factor sqrt(1 + ln(128 / 32) / ln(32)) on both tables; long factors from position 32 on.
    scale = (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(32.0))).sqrt()
    cos_sin = rotary.cos_sin_cache
    torch.testing.assert_close(cos_sin[0, :8], torch.full((8,), scale.item()))
    angle = torch.tensor([31.0, 32.0]) * (1.0 / torch.tensor([1.0, 2.0]))  # dimension 0: base**0 == 1
    torch.testing.assert_close(cos_sin[[31, 32], 0], angle.cos() * scale)


# ---------------------------------------------------------------- contexts extended by RoPE scaling
EXTENDED: dict[str, tuple[type, dict[str, Any], int]] = {
    # (config class, rope parameters on a 32-position base, the context we then allow)
    "yarn": (transformers.Qwen2Config, {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, 64),
    "dynamic": (transformers.LlamaConfig, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, 64),
    # linear configs state their extended length in max_position_embeddings already
    "linear": (transformers.LlamaConfig, {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, 32),
}


@pytest.mark.parametrize("kind", sorted(EXTENDED))
def test_rope_scaling_extends_the_context(kind: str, tmp_path) -> None:
    """YaRN and dynamic NTK on a 32-position base serve 64 positions (base x factor, as vLLM allows): a
    20-token prompt generates 40 tokens past the base context, token for token what transformers decodes
    with its KV cache; max_model_len above the extended context is refused."""
    cls, rope, allowed = EXTENDED[kind]
    torch.manual_seed(5)
    config = cls(**{**COMMON, "max_position_embeddings": 32, "rope_parameters": rope})
    hf = randomize_(transformers.AutoModelForCausalLM.from_config(config))
    hf.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    assert arch_of(tmp_path).max_context_len == allowed
    kw = dict(dtype="float32", kv_cache_memory_gb=0.01, block_size=4, log_level="WARNING")
    with pytest.raises(
        ValueError, match=rf"max_model_len={allowed + 1} exceeds the model's context length \({allowed}\)"
    ):
        LLM(str(tmp_path), max_model_len=allowed + 1, **kw)
    if allowed == 32:
        return
    prompt = torch.randint(2, VOCAB - 1, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    new = allowed - 20 - 4
    reference = hf_greedy(hf, [prompt], new, [EOS], stepwise=True)
    llm = LLM(str(tmp_path), max_model_len=allowed, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=new, logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)
    assert len(prompt) + len(out[0].outputs[0].token_ids) > 32 + 8  # well past the base context
    check_outputs(out, reference)
