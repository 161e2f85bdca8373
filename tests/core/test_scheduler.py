"""Scheduler on exact state: schedules, chunking, budgets, preemption, abort, priority, prefix hits.

The runner is replaced by its output contract only: a sampled token for every request whose scheduled
tokens reach the end of its known tokens, nothing for a partial prefill chunk.
"""

from tidellm.config import CacheConfig, SchedulerConfig
from tidellm.core.request import Request, RequestStatus
from tidellm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from tidellm.core.sched.scheduler import Scheduler
from tidellm.sample.params import SamplingParams

BS = 4


def make_sched(num_blocks=64, budget=32, max_seqs=8, policy="fcfs", max_len=256, caching=True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks,
        max_len,
    )


def req(rid, n_prompt=8, max_tokens=4, priority=0, arrival=0.0, tokens=None, **params) -> Request:
    tokens = tokens if tokens is not None else [100 + (hash(rid) + i) % 50 for i in range(n_prompt)]
    return Request(
        rid,
        tokens,
        SamplingParams(max_tokens=max_tokens, **params),
        eos_token_ids=[2],
        max_tokens=max_tokens,
        priority=priority,
        arrival_time=arrival,
        block_size=BS,
    )


def run_step(s: Scheduler, token=7) -> tuple[SchedulerOutput, list]:
    out = s.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[token] if s.requests[r].num_computed_tokens >= s.requests[r].num_tokens else [] for r in ids]
    return out, s.update_from_output(out, ModelRunnerOutput(ids, sampled))


def test_chunked_prefill_then_decode():
    s = make_sched(budget=8)
    s.add_request(req("a", n_prompt=20, max_tokens=3))
    o1, e1 = run_step(s)
    assert o1.num_scheduled_tokens == {"a": 8} and e1 == []
    assert o1.scheduled_new_reqs[0].block_ids == [[0, 1]]
    o2, _ = run_step(s)
    assert o2.num_scheduled_tokens == {"a": 8}
    assert (
        o2.scheduled_cached_reqs[0].new_block_ids == [[2, 3]]
        and o2.scheduled_cached_reqs[0].num_computed_tokens == 8
    )
    o3, e3 = run_step(s)
    assert o3.num_scheduled_tokens == {"a": 4} and e3[0].new_token_ids == [7]
    o4, _ = run_step(s)
    assert o4.num_scheduled_tokens == {"a": 1}
    assert o4.scheduled_cached_reqs[0].new_block_ids == [[5]]  # token 21 opens block 5
    _, e5 = run_step(s)
    assert e5[0].finish_reason == "length"
    assert not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == {"a"}
    assert s.kv.pool.num_free_blocks == 64


def test_decodes_first_then_new_prefill_within_budget():
    s = make_sched(budget=10)
    s.add_request(req("a", n_prompt=6, max_tokens=5))
    run_step(s)  # a prefilled, sampled 1 token
    s.add_request(req("b", n_prompt=30))
    o, _ = run_step(s)
    assert list(o.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    assert o.total_num_scheduled_tokens == 10


def test_max_num_seqs_and_long_prefill_threshold():
    s = Scheduler(
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, long_prefill_token_threshold=5),
        CacheConfig(block_size=BS),
        64,
        256,
    )
    for r in "abc":
        s.add_request(req(r, n_prompt=12))
    o, _ = run_step(s)
    assert o.num_scheduled_tokens == {"a": 5, "b": 5}
    assert len(s.waiting) == 1


def test_eos_stop_token_min_tokens():
    s = make_sched()
    s.add_request(req("a", max_tokens=10))
    _, e = run_step(s, token=2)
    assert e[0].finish_reason == "stop" and e[0].stop_reason is None
    s.add_request(req("b", max_tokens=10, min_tokens=2))
    _, e = run_step(s, token=2)
    assert e[0].finish_reason is None  # eos ignored before min_tokens
    _, e = run_step(s, token=2)
    assert e[0].finish_reason == "stop"
    s.add_request(req("c", max_tokens=10, stop_token_ids=[9]))
    _, e = run_step(s, token=9)
    assert (e[0].finish_reason, e[0].stop_reason) == ("stop", 9)
    s.add_request(req("d", max_tokens=2, ignore_eos=True))
    _, e = run_step(s, token=2)
    _, e = run_step(s, token=2)
    assert e[0].finish_reason == "length"


def test_max_model_len_stops_request():
    s = make_sched(max_len=10)
    s.add_request(req("a", n_prompt=8, max_tokens=100))
    run_step(s)
    _, e = run_step(s)
    assert e[0].finish_reason == "length" and len(e) == 1


def test_preemption_by_recompute_and_resume():
    # 6 blocks of 4: a (8 tokens) and b (8 tokens) take 2 each, then both grow.
    s = make_sched(num_blocks=6, budget=64)
    s.add_request(req("a", n_prompt=8, max_tokens=12, arrival=0))
    s.add_request(req("b", n_prompt=8, max_tokens=12, arrival=1))
    o, _ = run_step(s)
    assert s.kv.get_block_ids("a") == [[0, 1]] and s.kv.get_block_ids("b") == [[2, 3]]
    run_step(s)  # tokens 9: a → block 4, b → block 5
    assert s.kv.pool.num_free_blocks == 0
    for _ in range(3):
        run_step(s)
    # Next token opens a new block for a: no free block → b (last in FCFS order) is preempted.
    o, _ = run_step(s)
    assert o.preempted_req_ids == {"b"}
    assert list(o.num_scheduled_tokens) == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(s.waiting)[0] is b
    n_out_b = b.num_output_tokens
    assert n_out_b == 5
    # b resumes once a finishes; it comes back as a new request with its output tokens and a prefix hit.
    while "a" in s.requests:
        run_step(s)
    o, _ = run_step(s)
    new = o.scheduled_new_reqs[0]
    assert new.req_id == "b" and new.output_token_ids == [7] * n_out_b
    # b's blocks were freed tail first ([5, 3, 2]); a grew into 5 and 3, evicting them, so only block 2
    # (tokens 0-3) is still cached and b recomputes the rest.
    assert new.block_ids[0][0] == 2 and new.num_computed_tokens == 4
    assert o.num_scheduled_tokens == {"b": 13 - 4}
    while s.has_unfinished_requests():
        run_step(s)
    assert s.kv.pool.num_free_blocks == 6


def test_preemption_victim_under_priority_policy():
    s = make_sched(num_blocks=5, budget=64, policy="priority")
    s.add_request(req("low", n_prompt=8, max_tokens=20, priority=5, arrival=0))
    s.add_request(req("high", n_prompt=8, max_tokens=20, priority=0, arrival=1))
    o, _ = run_step(s)
    assert list(o.num_scheduled_tokens) == ["high", "low"]  # priority order, not arrival
    preempted = set()
    for _ in range(8):
        o, _ = run_step(s)
        preempted |= o.preempted_req_ids
    assert preempted == {"low"}
    assert s.requests["high"].num_preemptions == 0


def test_abort_frees_blocks_and_reports_to_runner():
    s = make_sched()
    s.add_request(req("a", n_prompt=10, max_tokens=50))
    s.add_request(req("w", n_prompt=10))
    run_step(s)
    done = s.finish_requests(["a", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in done] == ["a", "w"]
    assert s.kv.pool.num_free_blocks == 64 and not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == {"a", "w"}


def test_prefix_hit_is_counted_and_subtracted():
    s = make_sched(budget=64)
    prompt = list(range(10, 30))
    s.add_request(req("a", tokens=prompt, max_tokens=1))
    run_step(s)
    s.add_request(req("b", tokens=prompt + [1, 2], max_tokens=1))
    o, _ = run_step(s)
    assert o.scheduled_new_reqs[0].num_computed_tokens == 20
    assert o.num_scheduled_tokens == {"b": 2}
    stats = s.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20 + 22, 20)
