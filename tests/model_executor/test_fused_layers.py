"""The fused path (models/fused_layers.py: all layers of a step in one compiled call) against the layer-by-layer
path it replaces: the same tokens and bit-identical logprobs of prompts (prefill rows, chunked or not) and
outputs (decode rows), fp32 and bf16, on the real SmolLM2 GGUF (Q4_1 blocks) and on a sliding-window Mistral
re-quantized to Q8_0; and which models take it."""

from __future__ import annotations

import pytest
import torch
from test_sliding_window import mistral as mistral  # the tiny sliding-window Mistral fixture

from tidellm import LLM, SamplingParams
from tidellm.model_executor.kernels import cpu as cpu_kernels
from tidellm.model_executor.models.fused_layers import FusedLayers

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the CPU kernels")


def _runs(llm: LLM, prompts, params: SamplingParams, fused: bool, monkeypatch: pytest.MonkeyPatch):
    """Outputs with the fused path on or off, and how many steps it took."""
    model = llm.engine.core.runner.model.model
    model.fused_layers = None if fused else False
    calls = []
    real = cpu_kernels.run_layers
    monkeypatch.setattr(cpu_kernels, "run_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = llm.generate(prompts, params, use_tqdm=False)
    model.fused_layers = None
    return [
        (
            o.outputs[0].token_ids,
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
            [next(iter(lp.values())).logprob for lp in o.prompt_logprobs[1:]],
        )
        for o in outs
    ], len(calls)


@pytest.mark.parametrize("streams", [4, 24])
@pytest.mark.parametrize(
    "dtype,activations",
    [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "int8")],
)
def test_smollm2_fused_equals_layer_by_layer(
    dtype: str, activations: str, streams: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 and 24 streams: in bf16 on AVX-512 BF16 CPUs both batch sizes take the vdpbf16ps tiles (full tiles of 4
    rows, and 24 = 6 of them), in fp32 the fp32 block kernel; with int8 activations (AVX-512 VNNI CPUs) the
    int8 kernel in both dtypes."""
    if activations == "int8" and not cpu_kernels.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    # No prefix caching: the second run's prefill must compute what the first one did.
    llm = LLM("smollm2-135m", dtype=dtype, activation_quantization=activations, kv_cache_memory_gb=0.1,
              max_model_len=512, max_num_batched_tokens=32, enable_prefix_caching=False,
              log_level="WARNING")  # fmt: skip
    prompts = [
        "The tides rise and fall because",
        "def fibonacci(n):",
        "Paris is the capital of " * 20,  # ~100 tokens: prefilled in chunks of the 32-token step budget
        "1, 2, 3,",
    ] * (streams // 4)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    fused, fused_steps = _runs(llm, prompts, params, True, monkeypatch)
    plain, plain_steps = _runs(llm, prompts, params, False, monkeypatch)
    # decode steps, and the (chunked) prefill steps where the kernels take 32 rows (not bf16 without vdpbf16ps)
    prefills = 3 if FusedLayers.build(llm.engine.core.runner.model.model).max_rows >= 32 else 0
    assert plain_steps == 0 and fused_steps >= 11 + prefills
    assert fused == plain  # tokens and logprobs, bit for bit


def test_sliding_window_model_fused_equals_layer_by_layer(mistral, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Mistral with a 6-token window re-quantized to Q8_0 (its widths are whole blocks): the kernel applies
    the window per layer; decodes run far past it."""
    _, folder = mistral
    llm = LLM(str(folder), dtype="float32", quantization="q8_0", max_model_len=64, kv_cache_memory_gb=0.01,
              block_size=4, enable_prefix_caching=False, log_level="WARNING")  # fmt: skip
    assert isinstance(FusedLayers.build(llm.engine.core.runner.model.model), FusedLayers)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (3, 11, 7)]
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    fused, steps = _runs(llm, prompts, params, True, monkeypatch)
    plain, _ = _runs(llm, prompts, params, False, monkeypatch)
    assert steps >= 19 and fused == plain


def test_models_outside_the_fused_path(mistral, llm_fp32) -> None:
    """Dense weights (no blocks) keep the layer-by-layer path; the default model takes the fused one."""
    _, folder = mistral
    dense = LLM(str(folder), dtype="float32", max_model_len=64, kv_cache_memory_gb=0.01, log_level="WARNING")
    assert FusedLayers.build(dense.engine.core.runner.model.model) is None
    assert FusedLayers.build(llm_fp32.engine.core.runner.model.model) is not None
