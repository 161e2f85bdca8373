"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers in fp32.

- the fused expert layer against a naive per-token loop and against transformers' own sparse blocks;
- the paged model through the simulated engine of test_llama (chunked prefill, a prefix-cache hit, decodes
  interleaved with prefill chunks), loading transformers' stacked in-memory expert tensors;
- the real engine (``tidellm.LLM``) on tiny random checkpoints saved as safetensors folders (experts stored one
  by one, as on the hub): greedy tokens identical and logprobs within 1e-3, alone, batched, with chunked prefill
  and with prefix-cache hits (the folder and tokenizer helpers are test_families').
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from parity_utils import check_outputs, hf_greedy, tiny_llm
from safetensors.torch import load_file
from test_families import EOS, VOCAB, _write_tokenizer
from test_llama import _run_engine, randomize_

from tidellm import LLM, SamplingParams
from tidellm.model_executor.layers.fused_moe import FusedMoE, grouped_experts, route
from tidellm.model_executor.loader.hf_config import arch_from_hf_config
from tidellm.model_executor.models.registry import get_model_class

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def moe_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """Tiny configs that exercise each family's routing flags: Mixtral (always renormalised), Qwen2-MoE (shared
    expert, unnormalised top-k, a dense layer among sparse ones, QKV bias), Qwen3-MoE (q/k norm, normalised
    top-k, every other layer sparse)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip
    config_cls, family_kw = {
        "mixtral": (
            transformers.MixtralConfig,
            dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
        ),
        "qwen2_moe": (
            transformers.Qwen2MoeConfig,
            dict(
                intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
            ),
        ),
        "qwen3_moe": (
            transformers.Qwen3MoeConfig,
            dict(
                num_hidden_layers=4, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
            ),
        ),
    }[family]  # fmt: skip
    return config_cls(**{**common, **family_kw, **overrides})


def random_hf_moe(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Random weights (norms near one, the rest N(0, 0.15)): attention far from uniform, routing far from ties."""
    torch.manual_seed(seed)
    return randomize_(transformers.AutoModelForCausalLM.from_config(moe_config(family, **overrides)))


def arch_of(hf: transformers.PreTrainedModel):
    return arch_from_hf_config(hf.config.to_dict(), Path("in-memory"))


# ---------------------------------------------------------------- the fused expert layer
def naive_experts(x, gate_up, down, weights, ids) -> torch.Tensor:
    """One token and one chosen expert at a time: the definition."""
    out = torch.zeros_like(x)
    inter = down.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = gate_up[e] @ x[t]
            out[t] += weights[t, j] * (down[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 37])
@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_experts_match_naive(num_tokens: int, renormalize: bool) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, top_k, hidden, inter = 6, 3, 16, 24
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.3
    down = torch.randn(num_experts, hidden, inter, generator=g) * 0.3
    logits = torch.randn(num_tokens, num_experts, generator=g) * 2
    weights, ids = route(logits, top_k, renormalize)
    probs = torch.softmax(logits, -1)
    want_ids = probs.argsort(-1, descending=True)[:, :top_k]
    assert torch.equal(ids, want_ids)
    want_w = probs.gather(1, want_ids)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want_w)
    got = grouped_experts(x, gate_up, down, weights, ids)
    assert got.shape == (num_tokens, hidden)
    torch.testing.assert_close(got, naive_experts(x, gate_up, down, weights, ids), atol=1e-5, rtol=1e-5)


def test_grouped_experts_upcast_bf16() -> None:
    """The fp32-upcast path (CPUs without native bf16) computes with the bf16 weights' exact values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, generator=g).bfloat16()
    gate_up = (torch.randn(4, 48, 16, generator=g) * 0.3).bfloat16()
    down = (torch.randn(4, 16, 24, generator=g) * 0.3).bfloat16()
    weights, ids = route(torch.randn(9, 4, generator=g), 2, True)
    got = grouped_experts(x, gate_up, down, weights, ids, upcast=True)
    assert got.dtype == torch.bfloat16
    want = naive_experts(x.float(), gate_up.float(), down.float(), weights, ids)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "family, norm_topk_prob",
    [("mixtral", None), ("qwen2_moe", False), ("qwen3_moe", True), ("qwen3_moe", False)],
)
def test_sparse_block_matches_transformers(family: str, norm_topk_prob: bool | None) -> None:
    """Routing (softmax, top-k, renormalisation per family), experts and Qwen2-MoE's gated shared expert equal
    transformers' sparse block, with our model loaded from transformers' in-memory (stacked) tensors."""
    overrides = {} if norm_topk_prob is None else {"norm_topk_prob": norm_topk_prob}
    hf = random_hf_moe(family, seed=3, **overrides)
    arch = arch_of(hf)
    assert arch.moe.renormalize == (family == "mixtral" or bool(norm_topk_prob))
    model = get_model_class(arch)(arch)
    model.load_weights(hf.state_dict().items())
    layer_idx = 2 if family == "qwen2_moe" else 1  # sparse in every config
    ours, theirs = model.model.layers[layer_idx].mlp, hf.model.layers[layer_idx].mlp
    assert isinstance(ours.experts, FusedMoE)
    x = torch.randn(23, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = theirs(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_moe_rejects_bad_top_k_and_shards() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok must be in 1..4"):
        FusedMoE(4, 5, 8, 8, True, torch.float32, torch.device("cpu"))
    layer = FusedMoE(4, 2, 8, 6, True, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="expert 4 out of range"):
        layer.weight_loader(layer.gate_up_proj, torch.zeros(6, 8), (4, "gate"))
    with pytest.raises(ValueError, match=r"\(5, 8\) != expected \(6, 8\)"):
        layer.weight_loader(layer.gate_up_proj, torch.zeros(5, 8), (1, "up"))
    with pytest.raises(ValueError, match="'down' does not belong"):
        layer.weight_loader(layer.gate_up_proj, torch.zeros(8, 6), (1, "down"))


# ---------------------------------------------------------------- paged model vs transformers (simulated engine)
@pytest.mark.parametrize("family", FAMILIES)
def test_paged_parity_fp32(family: str) -> None:
    hf = random_hf_moe(family)
    _run_engine(hf, torch.float32, "cpu", atol=1e-4, arch=arch_of(hf))


def test_config_parsing() -> None:
    mixtral, qwen2, qwen3 = (arch_of(random_hf_moe(f)) for f in FAMILIES)
    assert (mixtral.moe.num_experts, mixtral.moe.num_experts_per_tok, mixtral.moe.intermediate_size) == (
        8,
        2,
        48,
    )
    assert mixtral.moe.renormalize and mixtral.moe.shared_expert_intermediate_size == 0
    assert [mixtral.moe.is_sparse(i) for i in range(3)] == [True, True, True]
    assert qwen2.moe.shared_expert_intermediate_size == 40 and not qwen2.moe.renormalize
    assert [qwen2.moe.is_sparse(i) for i in range(3)] == [True, False, True]
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert [qwen3.moe.is_sparse(i) for i in range(4)] == [False, True, False, True]
    assert qwen3.qk_norm and qwen3.moe.renormalize and not qwen3.attention_bias
    assert not {"num_experts", "num_local_experts"} & (
        set(qwen2.extra) | set(qwen3.extra) | set(mixtral.extra)
    )


# ---------------------------------------------------------------- the real engine on saved folders
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[transformers.PreTrainedModel, Path]]:
    """family -> (transformers model, its safetensors folder with experts stored one by one)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = random_hf_moe(family, seed=10 + i)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        _write_tokenizer(folder)
        out[family] = hf, folder
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in (3, 13, 30, 7, 21)]
    prompts[4][:12] = prompts[2][:12]  # a shared prefix of three 4-token blocks
    return prompts


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_parity_fp32(saved, family: str) -> None:
    """Each prompt alone, then all in one batch (hitting the blocks the alone runs left cached), with a step
    budget of 8 tokens so that every longer prompt is prefilled in chunks."""
    hf, folder = saved[family]
    prompts = _prompts()
    reference = hf_greedy(hf, prompts, MAX_NEW, [EOS])
    llm = tiny_llm(folder)
    assert type(llm.engine.core.runner.model).__name__ == ARCHITECTURES[family]
    check_outputs([llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts], reference)
    hits_before = llm.engine.core.scheduler.kv.stats.hits
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.stats.hits > hits_before
    check_outputs(batched, reference)


def test_saved_checkpoint_experts_one_by_one_and_errors_named(saved) -> None:
    folder = saved["mixtral"][1]
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(f))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in weights  # the hub layout we load
    arch = arch_from_hf_config(json.loads((folder / "config.json").read_text()), folder)
    del weights["model.layers.2.block_sparse_moe.experts.5.w3.weight"]
    with pytest.raises(
        ValueError, match=r"missing weights: \['model\.layers\.2\.block_sparse_moe\.experts\.5\.w3\.weight'\]"
    ):
        get_model_class(arch)(arch).load_weights(weights.items())
    weights["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = torch.zeros(48, 64)
    with pytest.raises(ValueError, match=r"experts\.8\.w1\.weight.*expert 8 out of range"):
        get_model_class(arch)(arch).load_weights(weights.items())


def test_quantization_q8_0_holds_experts_loaded_one_by_one_as_blocks(saved) -> None:
    """--quantization q8_0 on a folder storing experts one by one: Qwen3-MoE's experts go to blocks expert by
    expert (gate and up into one block matrix) and the engine matches transformers holding the same rounded
    weights; Mixtral's 48-wide experts are not whole blocks and stay dense."""
    from tidellm.model_executor.quant.blocks import QuantizedTensor

    hf, folder = saved["qwen3_moe"]
    llm = LLM(str(folder), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01, quantization="q8_0",
              log_level="WARNING")  # fmt: skip
    sparse = [
        layer.mlp.experts
        for layer in llm.engine.core.runner.model.model.layers
        if hasattr(layer.mlp, "experts")
    ]
    assert sparse and all(e.quant_method.fmt == "q8_0" for e in sparse)
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                flat = p.reshape(-1, p.shape[-1])
                p.copy_(QuantizedTensor.quantize(flat, "q8_0").dequantize().reshape(p.shape))
    prompts = _prompts()[:3]
    check_outputs(llm.generate(prompts, GREEDY, use_tqdm=False), hf_greedy(rounded, prompts, MAX_NEW, [EOS]))

    mixtral = LLM(str(saved["mixtral"][1]), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01,
                  quantization="q8_0", log_level="WARNING")  # fmt: skip
    assert mixtral.engine.core.runner.model.model.layers[0].mlp.experts.quant_method is None


def test_int8_activations_reach_the_experts(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    """--activation-quantization int8 (AVX-512 VNNI CPUs): block experts multiply through the int8 kernel,
    whose panels each expert builds on first use, and the outputs stay close to the same engine with fp32
    activations (the int8 rounding of activations is the only difference)."""
    from tidellm.model_executor.kernels import cpu as cpu_kernels

    if not cpu_kernels.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    _, folder = saved["qwen3_moe"]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    prompts = _prompts()[:3]
    outs = {}
    for act in ("none", "int8"):
        llm = LLM(str(folder), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01, quantization="q8_0",
                  activation_quantization=act, log_level="WARNING")  # fmt: skip
        experts = [
            layer.mlp.experts
            for layer in llm.engine.core.runner.model.model.layers
            if hasattr(layer.mlp, "experts")
        ]
        assert all(e.quant_method.int8 == (act == "int8") for e in experts)
        calls: list[int] = []

        def counting(*a, calls=calls, real=cpu_kernels.matmul_i8, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(cpu_kernels, "matmul_i8", counting)
        outs[act] = [o.outputs[0].logprobs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        monkeypatch.undo()
        assert (len(calls) > 0) == (act == "int8")
        if act == "int8":
            assert any(
                q._panels is not None for e in experts for q in e.qgate_up
            )  # built when first routed to
    drift = [
        abs(got[tok].logprob - lp.logprob)
        for ref, got in zip(outs["none"], outs["int8"], strict=True)
        for tok, lp in ref.items()
        if tok in got
    ]
    assert len(drift) >= 3 * 4 and max(drift) < 0.1, drift  # 0.035 measured
