"""Parity with Hugging Face transformers (fp32, greedy) on the real SmolLM2 weights.

Every prompt alone and all of them in one batch of mixed lengths must give token-identical output, and the
sampled tokens' logprobs must match transformers' log-softmax. The same holds under a tiny step budget
(chunked prefill), with prefix-cache hits, and with a KV pool so small that requests get preempted.
"""

from __future__ import annotations

import pytest
from parity_utils import check_outputs, hf_greedy

from tidellm import LLM, SamplingParams

MAX_NEW = 20
LONG = (
    "The history of computing is a story of people building tools to think with. "
    "Early mechanical calculators gave way to electronic machines, then to transistors and integrated circuits. "
) * 20


def _prompts(tok) -> list[list[int]]:
    chat1 = tok.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer briefly."}])
    chat2 = tok.apply_chat_template(
        [
            {"role": "system", "content": "You are a helpful pirate."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Arr, ahoy!"},
            {"role": "user", "content": "Now tell me about the sea."},
        ]
    )
    texts = [
        "The quick brown fox",
        LONG + "In summary,",
        "Le renard brun rapide saute par-dessus le chien paresseux. En anglais, cela signifie",
        "我喜欢学习新的语言，因为",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "Count with emoji: 1 🙂, 2 🙃, 3",
    ]
    return [tok.encode(t) for t in texts] + [tok.encode(c, add_special_tokens=False) for c in (chat1, chat2)]


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    p = _prompts(smollm2_tokenizer)
    assert max(len(x) for x in p) > 512, "the long prompt must need more than one default prefill chunk"
    return p


@pytest.fixture(scope="module")
def reference(hf_reference, prompts, smollm2_tokenizer):
    """Greedy tokens and per-step log-softmax of the sampled token, from transformers, one prompt at a time."""
    return hf_greedy(hf_reference, prompts, MAX_NEW, smollm2_tokenizer.eos_token_ids)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)


def test_each_prompt_alone(llm_fp32, prompts, reference):
    outputs = [llm_fp32.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    check_outputs(outputs, reference)


def test_all_prompts_in_one_batch(llm_fp32, prompts, reference):
    check_outputs(llm_fp32.generate(prompts, GREEDY, use_tqdm=False), reference)


def test_tiny_token_budget_chunked_prefill(prompts, reference):
    llm = LLM(
        "smollm2-135m",
        dtype="float32",
        kv_cache_memory_gb=0.25,
        max_model_len=2048,
        max_num_batched_tokens=16,
    )
    check_outputs(llm.generate(prompts, GREEDY, use_tqdm=False), reference)


def test_prefix_cache_hits_give_identical_output(prompts, reference):
    llm = LLM("smollm2-135m", dtype="float32", kv_cache_memory_gb=0.25, max_model_len=2048)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats0 = llm.engine.core.scheduler.kv.stats.hits
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    hits = llm.engine.core.scheduler.kv.stats.hits - stats0
    assert hits > 0
    assert sum(o.num_cached_tokens for o in again) == hits
    check_outputs(first, reference)
    check_outputs(again, reference)


def test_tiny_kv_pool_forces_preemption(prompts, reference):
    # Room for about 1.3 long prompts: the batch cannot all fit, so running requests get preempted.
    llm = LLM(
        "smollm2-135m",
        dtype="float32",
        max_model_len=880,
        kv_cache_memory_gb=56 * 16 * 46080 / 2**30,
        enable_prefix_caching=False,
    )
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert all(o.finished for o in outputs)
    check_outputs(outputs, reference)


def test_bf16_runs_and_mostly_agrees(prompts, reference):
    """bf16 may pick a different near-tie token; it must run and agree on most first tokens."""
    llm = LLM("smollm2-135m", dtype="bfloat16", kv_cache_memory_gb=0.25, max_model_len=2048)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    agree = sum(o.outputs[0].token_ids[0] == r[0][0] for o, r in zip(outs, reference, strict=True))
    assert agree >= len(prompts) - 2
