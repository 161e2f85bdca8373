"""Shared helpers for parity tests against transformers: greedy references and output checks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

Reference = tuple[list[int], list[float]]  # greedy tokens, log-softmax of each chosen token


def hf_greedy(
    model, prompts: Sequence[Sequence[int]], max_new: int, eos: Sequence[int], *, stepwise: bool = False
) -> list[Reference]:
    """transformers' greedy continuation of each prompt, run alone (no padding), with the per-step
    log-softmax of the chosen token. ``stepwise``: a plain KV-cached loop of one forward per token instead
    of ``generate`` (whose model-specific input preparation may re-encode the sequence, as Phi-3's does)."""
    if stepwise:
        return [_stepwise_greedy(model, list(ids), max_new, set(eos)) for ids in prompts]
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([list(ids)]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=list(eos),
                pad_token_id=eos[0],
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = gen.sequences[0, len(ids) :].tolist()
            lps = [
                torch.log_softmax(lg[0].float(), -1)[t].item()
                for lg, t in zip(gen.logits, tokens, strict=True)
            ]
            out.append((tokens, lps))
    return out


def _stepwise_greedy(model, ids: list[int], max_new: int, eos: set[int]) -> Reference:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    lps: list[float] = []
    step_ids, start = ids, 0
    with torch.no_grad():
        while len(tokens) < max_new:
            positions = torch.arange(start, start + len(step_ids))[None]
            logits = model(
                torch.tensor([step_ids]), position_ids=positions, cache=cache, use_cache=True
            ).logits
            logprobs = torch.log_softmax(logits[0, -1].float(), -1)
            token = int(logprobs.argmax())
            tokens.append(token)
            lps.append(logprobs[token].item())
            if token in eos:
                break
            start += len(step_ids)
            step_ids = [token]
    return tokens, lps


def check_outputs(outputs, reference: Sequence[Reference], *, logprob_tol: float | None = 1e-3) -> None:
    """tidellm's RequestOutputs (asked with ``logprobs=0``) give the reference tokens and logprobs."""
    for i, (out, (ref_tokens, ref_lps)) in enumerate(zip(outputs, reference, strict=True)):
        got = out.outputs[0].token_ids
        assert got == ref_tokens, f"prompt {i}: {got} != {ref_tokens}"
        if logprob_tol is not None:
            lps = [lp_dict[t].logprob for lp_dict, t in zip(out.outputs[0].logprobs, got, strict=True)]
            assert lps == pytest.approx(ref_lps, abs=logprob_tol), f"prompt {i}"


def arch_of(folder):
    """The ArchConfig the engine builds from a saved folder's config.json (through the loader's parsing)."""
    import json

    from tidellm.model_executor.loader.hf_config import arch_from_hf_config

    return arch_from_hf_config(json.loads((folder / "config.json").read_text()), folder)


def cached_folders(tmp_path_factory, build, write_tokenizer):
    """case -> (transformers model, its safetensors folder), each built (``build(case)``) and saved once."""
    built = {}

    def get(case: str):
        if case not in built:
            hf = build(case)
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            write_tokenizer(folder)
            built[case] = (hf, folder)
        return built[case]

    return get


# The engine settings of the tiny-model tests: 4-token blocks so short prompts share full blocks, and 8-token
# steps so every longer prompt is prefilled in chunks.
TINY_ENGINE = dict(
    dtype="float32",
    max_model_len=64,
    kv_cache_memory_gb=0.01,
    block_size=4,
    max_num_batched_tokens=8,
    log_level="WARNING",
)


def tiny_llm(source, **overrides):
    """``tidellm.LLM`` on a tiny test model (a folder or GGUF path) with TINY_ENGINE's settings."""
    from tidellm import LLM

    return LLM(str(source), **{**TINY_ENGINE, **overrides})


def check_gguf_file_parity(hf, path, vocab: int, lengths: Sequence[int], max_new: int, cache_dir) -> None:
    """A tiny GGUF file through ``tidellm.LLM`` (fp32, 4-token blocks, 8-token steps: longer prompts are
    prefilled in chunks) against transformers: each prompt alone, then all batched, where the second prompt's
    first two blocks, shared with the third, are prefix-cache hits. The saturated tiny models soon pick eos, so
    it is ignored and every step compared (stepwise, a KV-cached reference)."""
    from tidellm import SamplingParams

    llm = tiny_llm(path, cache_dir=str(cache_dir))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    prompts[2][:8] = prompts[1][:8]  # two shared 4-token blocks
    reference = hf_greedy(hf, prompts, max_new, [], stepwise=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new, logprobs=0, ignore_eos=True)
    check_outputs([llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts], reference)
    hits = llm.engine.core.scheduler.kv.stats.hits
    check_outputs(llm.generate(prompts, greedy, use_tqdm=False), reference)
    assert llm.engine.core.scheduler.kv.stats.hits > hits
