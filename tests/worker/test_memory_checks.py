"""Start-up refuses, with the numbers and a fix, a model or a context that does not fit in memory."""

from __future__ import annotations

import pytest

from tidellm import LLM
from tidellm.model_executor.loader import ModelLoadError


def test_model_larger_than_memory_is_a_clear_error(monkeypatch):
    # Pretend the machine has 100 MiB free: the platform probe is the one thing we cannot change for real.
    monkeypatch.setattr("tidellm.worker.model_runner.available_memory_bytes", lambda device: 100 * 2**20)
    with pytest.raises(ModelLoadError, match=r"needs 0\.\d+ GiB for its weights .* only 0\.10 GiB") as e:
        LLM("smollm2-135m", dtype="float32")
    assert "smaller" in str(e.value)


def test_kv_budget_too_small_for_max_model_len():
    with pytest.raises(
        ValueError, match=r"cannot hold one sequence of max_model_len=4096.*Raise kv_cache_memory_gb"
    ):
        LLM("smollm2-135m", dtype="float32", kv_cache_memory_gb=0.01, max_model_len=4096)


def test_unset_max_model_len_shrinks_to_the_kv_capacity():
    llm = LLM("smollm2-135m", dtype="float32", kv_cache_memory_gb=0.01)
    plan = llm.engine.core.runner.kv_plan
    assert llm.engine.max_model_len == plan.capacity_tokens < 8192


def test_kv_budget_larger_than_memory_is_a_clear_error():
    from tidellm.platforms import available_memory_bytes

    too_much = available_memory_bytes(__import__("torch").device("cpu")) / 2**30 + 64
    with pytest.raises(ValueError, match=r"kv_cache_memory_gb=.* more than the memory available.*lower"):
        LLM("smollm2-135m", dtype="float32", kv_cache_memory_gb=too_much)
