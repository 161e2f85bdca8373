"""Behind the server, small steps leave one core to the API process and its clients; large ones use all."""

from __future__ import annotations

import os

import pytest
import torch

from tidellm import LLM, SamplingParams
from tidellm.worker import model_runner


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_small_steps_run_on_one_thread_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    llm = LLM("smollm2-135m", dtype="float32", kv_cache_memory_gb=0.1, max_model_len=512)
    runner = llm.engine.core.runner
    seen: list[tuple[int, int]] = []  # (tokens in the step, threads it ran on)
    forward = runner.model.forward
    monkeypatch.setattr(
        runner.model,
        "forward",
        lambda ids, pos: seen.append((ids.numel(), torch.get_num_threads())) or forward(ids, pos),
    )
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    try:
        llm.generate([list(range(100, 140))], params, use_tqdm=False)
        assert {t for _, t in seen} == {threads}  # offline: every step on every thread
        seen.clear()
        runner.leave_a_core_on_small_steps()
        llm.generate([list(range(200, 240))], params, use_tqdm=False)  # another prompt: no prefix-cache hit
        prefill, *decodes = seen
        assert prefill == (40, threads)  # above SMALL_STEP_TOKENS: all threads
        assert decodes and all(n <= model_runner.SMALL_STEP_TOKENS and t == threads - 1 for n, t in decodes)
    finally:
        torch.set_num_threads(threads)
