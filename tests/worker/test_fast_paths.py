"""CI-sized performance smoke test: not timed, it checks that serving the default model takes the fast CPU
paths -- GGUF blocks through the compiled matmul kernels (int8 activations where the CPU has VNNI and the
model runs in bf16), the fused RMSNorm, attention straight from the paged cache, each step's layers in one
compiled call -- and that none of the slow fallbacks runs. A missing compiler or a silently changed
dispatch rule fails here instead of showing up weeks later as a slower benchmark."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tidellm import LLM, SamplingParams
from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.layers.attention import sdpa_backend
from tidellm.model_executor.layers.linear import Linear
from tidellm.model_executor.quant.method import BlockQuantLinearMethod
from tidellm.platforms import cpu_has_native_bf16


@pytest.fixture(scope="module")
def llm_bf16():
    return LLM("smollm2-135m", dtype="bfloat16", kv_cache_memory_gb=0.25, max_model_len=2048)


@pytest.fixture(scope="module")
def llm_bf16_no_int8():
    return LLM(
        "smollm2-135m", dtype="bfloat16", activation_quantization="none", kv_cache_memory_gb=0.25,
        max_model_len=2048,
    )  # fmt: skip


@pytest.fixture(params=["float32", "bfloat16"])
def llm(request):
    """``dtype auto`` is one or the other depending on the CPU: both must stay on the fast paths."""
    return request.getfixturevalue("llm_fp32" if request.param == "float32" else "llm_bf16")


def _counting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    calls: Counter[str] = Counter()

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    for name in (
        "matmul", "matmul_bf16_dot", "matmul_i8", "rms_norm", "paged_decode", "dequantize", "run_layers",
        "sample",
    ):  # fmt: skip
        monkeypatch.setattr(cpu_kernels, name, count(name, getattr(cpu_kernels, name)))
    monkeypatch.setattr(sdpa_backend, "_decode", count("slow_decode", sdpa_backend._decode))
    monkeypatch.setattr(F, "rms_norm", count("slow_rms_norm", F.rms_norm))
    monkeypatch.setattr(F, "linear", count("linear", F.linear))
    monkeypatch.setattr(F, "scaled_dot_product_attention", count("sdpa", F.scaled_dot_product_attention))
    return calls


def test_default_model_runs_on_the_fast_cpu_paths(llm, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_kernels.available(), "the CPU kernels must build on CI machines (is a C++ compiler installed?)"
    runner = llm.engine.core.runner
    model = runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.arch.num_hidden_layers
    assert all(isinstance(m.linear_method, BlockQuantLinearMethod) for m in linears)
    assert {m.qweight.fmt for m in linears} == {"q4_1"}  # the file's Q4_1, not widened
    embed = model.model.embed_tokens
    assert model.lm_head.source is embed and embed.qweight.fmt == "q8_0"
    int8 = linears[0].linear_method.block.int8
    assert int8 == (cpu_kernels.has_vnni() and runner.dtype == torch.bfloat16)
    # vs 538 MB as dense fp32; with int8 activations the int8 kernel's panels hold a second copy
    assert runner.load_report.weight_bytes < 130e6 * (2 if int8 else 1)

    calls = _counting(monkeypatch)
    out = llm.generate(
        ["The capital of France is", "def add(a, b):"],
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    # the prefill step (which samples the first token; 5 + 7 prompt rows, within every build's fused row limit,
    # 12 for bf16 without vdpbf16ps) and 5 decode steps
    steps = 6
    # Each step, the prefill included, runs its 30 layers in one compiled call (models/fused_layers.py), whose
    # attention reads the cache in place; Python calls only the final norm and the LM head.
    assert calls["run_layers"] == steps
    assert calls["paged_decode"] == calls["sdpa"] == 0
    assert calls["rms_norm"] == steps
    # every LM head goes through a block kernel: with int8 activations (bf16 on AVX-512 VNNI CPUs) the int8
    # one, else the fp32 one (bf16 batches of 4+ rows on AVX-512 BF16 CPUs: the vdpbf16ps one)
    kernels = ("matmul_i8",) if int8 else ("matmul", "matmul_bf16_dot")
    assert sum(calls[k] for k in kernels) == steps
    assert calls["sample"] == steps  # the sampler's compiled call, not torch's argmax
    for slow in ("slow_decode", "slow_rms_norm", "linear", "dequantize"):
        assert calls[slow] == 0, f"fell back to {slow}"


def test_large_batches_widen_in_the_fastest_dtype(llm_bf16_no_int8, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without int8 activations, a long prompt's prefill (more rows than the kernel takes) widens the blocks
    and uses the GEMM: in bf16 where the CPU multiplies bf16 natively (about 4x fp32 there), else in fp32 (bf16
    GEMMs are emulated)."""
    widened: list[torch.dtype] = []
    real = cpu_kernels.dequantize
    monkeypatch.setattr(cpu_kernels, "dequantize", lambda *a: widened.append(a[-1].dtype) or real(*a))
    llm = llm_bf16_no_int8
    llm.generate([list(range(100, 300))], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    layers = llm.engine.core.runner.model.arch.num_hidden_layers
    assert len(widened) == 4 * layers  # the LM head runs on the last token only: the kernel
    assert set(widened) == {torch.bfloat16 if cpu_has_native_bf16() else torch.float32}


def test_int8_activations_take_every_batch(llm_bf16, monkeypatch: pytest.MonkeyPatch) -> None:
    """With int8 activations (the default in bf16 on AVX-512 VNNI CPUs) a 200-token prefill also runs on the
    int8 kernel, nothing widened: in the fused call, and layer by layer (models the fused path does not take)
    through the same kernel, its attention in place."""
    if not cpu_kernels.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: activations stay in bf16")
    model = llm_bf16.engine.core.runner.model
    layers = model.arch.num_hidden_layers
    prompt, params = [list(range(100, 300))], SamplingParams(max_tokens=2, ignore_eos=True)
    for fused in (True, False):
        model.model.fused_layers = None if fused else False
        calls = _counting(monkeypatch)
        try:
            llm_bf16.generate(prompt, params, use_tqdm=False)
        finally:
            model.model.fused_layers = None
        if fused:  # the prefill step and the decode step: one call each, then their LM heads
            assert calls["run_layers"] == 2 and calls["matmul_i8"] == 2
        else:  # the 4 matmuls of each layer and the LM head, in each of the two steps
            assert calls["run_layers"] == 0 and calls["matmul_i8"] == 2 * (4 * layers + 1)
            assert calls["paged_decode"] == 2 * layers
        for slow in ("dequantize", "linear", "matmul", "matmul_bf16_dot", "sdpa", "slow_decode"):
            assert calls[slow] == 0, f"took {slow}"
