"""The offline LLM API on the real model: sampling, n, stop strings, logprobs, chat, errors, metrics."""

from __future__ import annotations

import pytest
import torch

from tidellm import LLM, SamplingParams


def test_results_in_input_order_with_fields(llm_fp32):
    prompts = ["One", "Two three four five six", "Seven eight"]
    outs = llm_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.finished and o.prompt_token_ids == llm_fp32.get_tokenizer().encode(o.prompt)
        c = o.outputs[0]
        assert len(c.token_ids) == 5 and c.finish_reason == "length" and isinstance(c.text, str)
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.time_to_first_token >= 0 and m.e2e_latency >= m.time_to_first_token


def test_token_id_prompts(llm_fp32):
    tok = llm_fp32.get_tokenizer()
    ids = tok.encode("Hello there")
    a = llm_fp32.generate(ids, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    b = llm_fp32.generate("Hello there", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert a.prompt is None and a.outputs[0].token_ids == b.outputs[0].token_ids


def test_seeded_sampling_same_alone_and_in_busy_batch(llm_fp32):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    alone = llm_fp32.generate(["Once upon a time"], p, use_tqdm=False)[0].outputs[0].text
    noise = SamplingParams(temperature=1.2, max_tokens=30)
    busy_prompts = ["A long unrelated prompt about oceans " * 5, "Once upon a time", "x", "Numbers: 1 2 3"]
    busy_params = [noise, p, noise, SamplingParams(temperature=0.8, seed=7, max_tokens=10)]
    busy = llm_fp32.generate(busy_prompts, busy_params, use_tqdm=False)
    assert busy[1].outputs[0].text == alone
    other = llm_fp32.generate(
        ["Once upon a time"],
        SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24),
        use_tqdm=False,
    )
    assert other[0].outputs[0].text != alone


def test_n_completions(llm_fp32):
    out = llm_fp32.generate(
        "My favourite colour is", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False
    )
    assert len(out) == 1
    comps = out[0].outputs
    assert [c.index for c in comps] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) > 1


def test_stop_string_truncates_and_reports(llm_fp32):
    prompt = "List the days of the week: Monday, Tuesday,"
    full = (
        llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
        .outputs[0]
        .text
    )
    stop = full.strip().split()[1]  # the second word of the continuation
    idx = full.index(stop)
    out = llm_fp32.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False
    )[0]
    c = out.outputs[0]
    assert c.text == full[:idx]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    inc = llm_fp32.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert inc.outputs[0].text == full[: idx + len(stop)]
    assert llm_fp32.engine.core.scheduler.num_unfinished == 0  # the core request was aborted


def test_logprobs_top_n(llm_fp32):
    out = llm_fp32.generate(
        "The sky is", SamplingParams(temperature=0, max_tokens=3, logprobs=5), use_tqdm=False
    )[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 3
    for tid, pos in zip(c.token_ids, c.logprobs, strict=True):
        assert tid in pos and pos[tid].rank == 1  # greedy: the sampled token is the top one
        assert 5 <= len(pos) <= 6
        top = sorted((lp for lp in pos.values() if lp.rank), key=lambda x: x.rank)
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:], strict=False))
    assert c.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for p, t in zip(c.logprobs, c.token_ids, strict=False))
    )


def test_prompt_logprobs_match_transformers(llm_fp32, hf_reference):
    tok = llm_fp32.get_tokenizer()
    text = "Paris is the capital of France and"
    ids = tok.encode(text)
    out = llm_fp32.generate(
        text, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False
    )[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(hf_reference(torch.tensor([ids])).logits[0].float(), -1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)


def test_chat_matches_generate_on_template(llm_fp32):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    p = SamplingParams(temperature=0, max_tokens=12)
    chat = llm_fp32.chat(msgs, p, use_tqdm=False)[0]
    tok = llm_fp32.get_tokenizer()
    ids = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    gen = llm_fp32.generate([ids], p, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
    assert "<|im_start|>assistant" in chat.prompt
    two = llm_fp32.chat([msgs, [{"role": "user", "content": "Name a colour."}]], p, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].text == chat.outputs[0].text


def test_eos_finishes_with_stop_and_is_not_in_text(llm_fp32):
    msgs = [{"role": "user", "content": "Reply with just the word yes."}]
    out = llm_fp32.chat(msgs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm_fp32.get_tokenizer().eos_token_ids
    assert "<|im_end|>" not in out.text


def test_clear_errors(llm_fp32):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_model_len|context"):
        llm_fp32.generate([[5] * 3000], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm_fp32.generate([[10**7]], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm_fp32.generate([[]], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm_fp32.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)
    # The engine is still healthy afterwards.
    assert llm_fp32.generate("ok", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_max_tokens_clipped_to_context(llm_fp32):
    tok = llm_fp32.get_tokenizer()
    n = llm_fp32.engine.max_model_len - 3
    out = llm_fp32.generate(
        [[tok.encode("a")[0]] * n], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].finish_reason == "length"


def test_priority_order_under_load():
    llm = LLM(
        "smollm2-135m",
        dtype="float32",
        kv_cache_memory_gb=0.05,
        max_model_len=512,
        max_num_seqs=1,
        policy="priority",
    )
    p = SamplingParams(temperature=0, max_tokens=2)
    outs = llm.generate(["a", "b", "c"], p, priority=[5, 0, 1], use_tqdm=False)
    order = sorted(range(3), key=lambda i: outs[i].metrics.first_token_time)
    assert order == [1, 2, 0]


def test_offline_batches_fill_the_token_budget(llm_fp32):
    """The offline LLM returns whole batches, so its steps fill the token budget (``prefill_batching auto``);
    the server's latency-first batching is there when asked for."""
    assert llm_fp32.engine.core.scheduler.config.prefill_batching == "budget"
    llm = LLM("smollm2-135m", kv_cache_memory_gb=0.05, max_model_len=512, prefill_batching="adaptive")
    assert llm.engine.core.scheduler.config.prefill_batching == "adaptive"


def test_vllm_style_prompt_dicts(llm_fp32):
    """vLLM's TextPrompt / TokensPrompt dicts give what the string and the token ids give."""
    from tidellm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=5)
    text = "The capital of France is"
    ids = llm_fp32.get_tokenizer().encode(text)
    plain = [o.outputs[0].token_ids for o in llm_fp32.generate([text, ids], greedy, use_tqdm=False)]
    dicts = llm_fp32.generate([{"prompt": text}, {"prompt_token_ids": ids}], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == plain
    one = llm_fp32.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in one] == plain[1:]
    with pytest.raises(
        ValueError, match="exactly one key, 'prompt'.*got keys \\['multi_modal_data', 'prompt'\\]"
    ):
        llm_fp32.generate({"prompt": text, "multi_modal_data": {}}, greedy, use_tqdm=False)


def test_greedy_output_does_not_depend_on_the_batch():
    """Users of other engines see greedy outputs change with what else is in the batch (peers' user asks,
    #7). On the default path every row's numbers are its own: a prompt decoded alone and amid 15 others (of
    5-300 tokens, prefilled in chunks beside it) gives the same tokens, and where activations are int8 (every
    matmul the int8 kernel, whatever the batch) the same logprobs bit for bit; elsewhere a large batch's
    prefill takes the BLAS path, within rounding of the block kernels."""
    import numpy as np

    from tidellm.model_executor.quant.method import int8_activations

    llm = LLM("smollm2-135m", kv_cache_memory_gb=0.25, max_model_len=2048, enable_prefix_caching=False)
    runner = llm.engine.core.runner
    rng = np.random.default_rng(0)
    others = [
        {"prompt_token_ids": rng.integers(100, 40000, int(n)).tolist()} for n in rng.integers(5, 300, 15)
    ]
    target = "The history of the printing press begins"
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=0)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0]
    mixed = llm.generate(others[:7] + [target] + others[7:], params, use_tqdm=False)[7].outputs[0]
    assert mixed.token_ids == alone.token_ids
    lp_alone = [next(iter(d.values())).logprob for d in alone.logprobs]
    lp_mixed = [next(iter(d.values())).logprob for d in mixed.logprobs]
    exact = int8_activations("auto", runner.dtype, runner.device)
    atol = 0.0 if exact else 1e-4 if runner.dtype == torch.float32 else 0.1
    assert max(abs(a - b) for a, b in zip(lp_alone, lp_mixed, strict=True)) <= atol
