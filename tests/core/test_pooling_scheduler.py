"""The embedding scheduler: whole prompts batched by the token budget and max_num_seqs, queue order, aborts."""

from __future__ import annotations

import pytest

from tidellm.config import SchedulerConfig
from tidellm.core.request import RequestStatus
from tidellm.core.sched.pooling import PoolingRequest, PoolingRunnerOutput, PoolingScheduler


def _sched(
    budget: int = 100, max_seqs: int = 8, policy: str = "fcfs", max_len: int = 512
) -> PoolingScheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy)
    return PoolingScheduler(cfg, max_len)


def _add(s: PoolingScheduler, rid: str, n: int, t: float = 0.0, priority: int = 0) -> None:
    s.add_request(PoolingRequest(rid, list(range(1, n + 1)), arrival_time=t, priority=priority))


def _run(s: PoolingScheduler) -> list[list[str]]:
    """Batches of request ids, step by step, until nothing waits; every request finishes in its step."""
    batches = []
    while s.has_unfinished_requests():
        out = s.schedule()
        assert not out.is_empty
        runner = PoolingRunnerOutput(out.req_ids, [[float(len(p))] for p in out.prompt_token_ids])
        done = s.update_from_output(out, runner)
        assert [o.request_id for o in done] == out.req_ids
        assert all(o.finish_reason == "stop" and o.new_token_ids == [] and o.scheduled_time for o in done)
        assert [o.pooled for o in done] == [[float(len(p))] for p in out.prompt_token_ids]
        batches.append(out.req_ids)
    return batches


def test_token_budget_batches_whole_prompts():
    s = _sched(budget=100)
    for rid, n in [("a", 30), ("b", 50), ("c", 30), ("d", 20), ("e", 90)]:
        _add(s, rid, n)
    # a+b = 80; c would exceed 100 -> next step: c+d = 50, e (90) does not fit -> alone.
    assert _run(s) == [["a", "b"], ["c", "d"], ["e"]]
    assert s.make_stats().num_waiting == 0 and not s.requests


def test_prompt_longer_than_budget_runs_alone_and_max_num_seqs_caps_the_batch():
    s = _sched(budget=16, max_seqs=2)
    _add(s, "long", 300)
    for i in range(3):
        _add(s, f"s{i}", 2)
    assert _run(s) == [["long"], ["s0", "s1"], ["s2"]]


def test_priority_policy_orders_the_queue():
    s = _sched(budget=10, policy="priority")
    _add(s, "late-urgent", 10, t=2.0, priority=-1)
    _add(s, "early", 10, t=1.0)
    _add(s, "later", 10, t=3.0)
    assert _run(s) == [["late-urgent"], ["early"], ["later"]]


def test_abort_removes_a_waiting_request_and_is_reported_once():
    s = _sched()
    _add(s, "a", 5)
    _add(s, "b", 5)
    assert [r.request_id for r in s.finish_requests(["b", "unknown"], RequestStatus.FINISHED_ABORTED)] == [
        "b"
    ]
    assert s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED) == []
    out = s.schedule()
    assert out.req_ids == ["a"] and out.finished_req_ids == {"b"}
    assert s.schedule().finished_req_ids == set()


@pytest.mark.parametrize("n", [0, 513])
def test_request_outside_1_to_max_model_len_is_refused(n):
    with pytest.raises(ValueError, match="max_model_len=512"):
        _add(_sched(), "x", n)
