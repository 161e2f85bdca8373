"""Gemma 3 text (``Gemma3ForCausalLM``) against transformers in fp32, on tiny random models saved as
safetensors folders: interleaved sliding-window and global layers with their two RoPE bases, q/k norms,
(1 + w) norms, the scaled embedding, GeGLU, query_pre_attn_scalar, tied embeddings, final logit soft-capping.

Two levels, as for the other families: our paged model through test_llama's simulated engine (every chunk
and decode within 1e-4 of transformers' full-sequence forward; sequences longer than the window, chunked
prefill, a prefix-cache hit) and the real engine ``tidellm.LLM(<folder>)`` against ``generate`` (greedy
tokens identical, logprobs within 1e-3, alone, batched, chunked, with prefix hits). Plus the refusals.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers
from parity_utils import arch_of, cached_folders, check_outputs, hf_greedy, tiny_llm
from test_families import _write_tokenizer
from test_llama import DEVICES, _run_engine, randomize_

from tidellm import LLM, SamplingParams
from tidellm.core.kv_cache.groups import KVCacheGroups
from tidellm.model_executor.layers.attention import layer_windows
from tidellm.model_executor.loader.hf_config import arch_from_hf_config
from tidellm.model_executor.models.registry import get_model_class

VOCAB = 256
EOS = VOCAB - 1
WINDOW = 6
S, F = "sliding_attention", "full_attention"
COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    sliding_window=WINDOW,
    layer_types=[S, F, S, S],
    query_pre_attn_scalar=24,
    rope_parameters={
        F: {"rope_type": "default", "rope_theta": 1_000_000.0},
        S: {"rope_type": "default", "rope_theta": 10_000.0},
    },
    bos_token_id=2,
    eos_token_id=EOS,
    pad_token_id=0,
)
CASES: dict[str, dict[str, Any]] = {
    "base": {},
    "mqa_softcap": {"num_key_value_heads": 1, "final_logit_softcapping": 3.0},
    "untied_local_first_global_last": {"tie_word_embeddings": False, "layer_types": [S, S, S, F]},
    "linear_rope_global": {
        "rope_parameters": {
            F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            S: {"rope_type": "default", "rope_theta": 10_000.0},
        }
    },
}


def _hf_model(case: str, seed: int = 0) -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**COMMON, **CASES[case]}))
    model = randomize_(model)
    with torch.no_grad():  # Gemma scales by 1 + w: centre the norm weights on zero as checkpoints do
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1.0)
    return model


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    """case -> (transformers model, its safetensors folder), built once per case."""
    return cached_folders(tmp_path_factory, _hf_model, _write_tokenizer)


def test_config_and_layers(gemma_folder) -> None:
    hf, folder = gemma_folder("base")
    arch = arch_of(folder)
    assert (arch.architecture, arch.model_type, arch.sliding_window) == (
        "Gemma3ForCausalLM",
        "gemma3",
        WINDOW,
    )
    assert arch.extra["rope_local_base_freq"] == 10_000.0 and arch.rope_theta == 1_000_000.0
    model = get_model_class(arch)(arch)
    model.load_weights(hf.state_dict().items())
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [WINDOW, None, WINDOW, WINDOW]
    assert model.model.layers[1].self_attn.attn.scale == 24**-0.5
    # Mixed layers: the global layer gets a block table of its own, each local layer one too (groups of
    # one layer, the global layers' count), all in one cache tensor.
    groups = KVCacheGroups.from_layer_windows(layer_windows(model))
    assert (groups.windows, groups.layers, groups.num_slots) == (
        (None, WINDOW, WINDOW, WINDOW),
        ((1,), (0,), (2,), (3,)),
        1,
    )
    assert model.lm_head.source is model.model.embed_tokens
    # The (1 + w) scale is folded into the stored weight.
    ours, theirs = (
        model.model.layers[0].pre_feedforward_layernorm.weight,
        hf.model.layers[0].pre_feedforward_layernorm.weight,
    )
    torch.testing.assert_close(ours, 1.0 + theirs, rtol=0, atol=0)


def test_v4_config_with_sliding_window_pattern(gemma_folder, tmp_path) -> None:
    """v4 configs give the pattern (every n-th layer global) and rope_local_base_freq at the top level."""
    _, folder = gemma_folder("base")
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    del config["layer_types"]
    config.update(sliding_window_pattern=2, rope_theta=rope[F]["rope_theta"], rope_local_base_freq=5000.0)
    arch = arch_from_hf_config(config, tmp_path)
    model = get_model_class(arch)(arch)
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [WINDOW, None] * 2
    local = model.model.rotary_emb_local.cos_sin_cache
    assert local[1, 1].item() == pytest.approx(torch.cos(torch.tensor(5000.0 ** (-2 / 16))).item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_parity_fp32(case: str, device: str, gemma_folder) -> None:
    hf, folder = gemma_folder(case)
    _run_engine(hf, torch.float32, device, atol=1e-4, arch=arch_of(folder))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_runs_close(device: str, gemma_folder) -> None:
    hf, folder = gemma_folder("base")
    _run_engine(hf, torch.bfloat16, device, atol=0.15, rtol=0.05, arch=arch_of(folder))


# ---------------------------------------------------------------- the real engine vs generate
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB - 1, (n,), generator=g).tolist() for n in (3, 13, 30, 7, 21)]
    prompts[4][:12] = prompts[2][:12]  # a shared prefix of three 4-token blocks
    return prompts


@pytest.mark.parametrize("case", ["base", "mqa_softcap"])
def test_llm_parity_fp32(case: str, gemma_folder) -> None:
    hf, folder = gemma_folder(case)
    prompts = _prompts()
    reference = hf_greedy(hf, prompts, MAX_NEW, [EOS])
    llm = tiny_llm(folder)  # 8-token steps: every prompt longer than that is prefilled in chunks
    assert llm.engine.core.scheduler.kv.windows == (None, WINDOW, WINDOW, WINDOW)
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    hits_before = llm.engine.core.scheduler.kv.stats.hits
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.stats.hits > hits_before
    check_outputs(batched, reference)


# Bytes of one block id with block_size 4: K and V of 4 tokens x 2 heads x 16 dims in fp32, in one tensor
# (the four groups of one layer share it).
BLOCK_BYTES = 2 * 4 * 2 * 16 * 4


def _small_pool_llm(folder, num_blocks: int, **kw) -> LLM:
    return tiny_llm(folder, kv_cache_memory_gb=num_blocks * BLOCK_BYTES / 2**30, **kw)


def test_local_layers_hand_back_blocks_behind_their_window(gemma_folder) -> None:
    """120 blocks for five sequences whose 51 blocks per layer group would need 204 if the local layers kept
    every block: the three local groups keep only their window, so nobody is preempted, and the blocks they
    hand back are reused by the others while the outputs stay transformers'."""
    hf, folder = gemma_folder("base")
    prompts = _prompts()
    per_group = sum(-(-(len(p) + MAX_NEW) // 4) for p in prompts)
    llm = _small_pool_llm(folder, 120, enable_prefix_caching=False)
    kv = llm.engine.core.scheduler.kv
    assert kv.num_blocks == 120 < 4 * per_group
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions == 0
    check_outputs(outputs, hf_greedy(hf, prompts, MAX_NEW, [EOS]))


def test_hybrid_groups_under_preemption_and_prefix_hits(gemma_folder) -> None:
    """Ten requests in 40 blocks: some are preempted and resumed, and prefix hits need the global group's
    whole prefix but only the local groups' last window; the outputs stay transformers'."""
    hf, folder = gemma_folder("base")
    g = torch.Generator().manual_seed(11)
    prompts = _prompts() + [
        torch.randint(3, VOCAB - 1, (n,), generator=g).tolist() for n in (25, 9, 17, 28, 11)
    ]
    prompts[6][:16] = prompts[2][:16]
    llm = _small_pool_llm(folder, 40)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    scheduler = llm.engine.core.scheduler
    assert scheduler.num_preemptions > 0 and scheduler.kv.stats.hits > 0
    check_outputs(outputs, hf_greedy(hf, prompts, MAX_NEW, [EOS]))
    assert scheduler.kv.pool.num_free_blocks == 40


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0.*not supported"),
        ({"use_bidirectional_attention": True}, "bidirectional attention.*not supported"),
        ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
        ({"layer_types": [S, F]}, "layer_types must list 4 entries"),
    ],
)
def test_unsupported_configs_refused(gemma_folder, tmp_path, override: dict, message: str) -> None:
    _, folder = gemma_folder("base")
    config = {**json.loads((folder / "config.json").read_text()), **override}
    arch = arch_from_hf_config(config, tmp_path)
    with pytest.raises(ValueError, match=message):
        get_model_class(arch)(arch)
