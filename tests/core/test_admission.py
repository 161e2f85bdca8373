"""How many waiting prompts a step starts (core/sched/admission.py): the fitted step cost, the batch size rule,
and the scheduler applying it (``prefill_batching adaptive``) or filling the budget (``budget``)."""

import math
import random

import pytest
from test_scheduler import req, run_step

from tidellm.config import CacheConfig, SchedulerConfig
from tidellm.core.sched.admission import PRIOR, StepCost, prompts_to_start
from tidellm.core.sched.output import ModelRunnerOutput
from tidellm.core.sched.scheduler import Scheduler


def _sched(batching: str, budget: int = 512) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, prefill_batching=batching),
        CacheConfig(block_size=16, enable_prefix_caching=False),
        num_blocks=512,
        max_model_len=2048,
    )


def test_step_cost_learns_the_machine_from_noisy_steps() -> None:
    """Steps of a machine 10x slower per token than the prior, with a 3x larger fixed part and 5% noise."""
    true = (12e-3, 2e-3, 1e-3)
    cost, rng = StepCost(), random.Random(0)
    for _ in range(300):
        prefill, decodes = rng.choice([0, 0, 100, 200, 512]), rng.randint(0, 64)
        seconds = (true[0] + true[1] * prefill + true[2] * decodes) * rng.uniform(0.95, 1.05)
        cost.observe(prefill, decodes, seconds)
    fitted = (cost.fixed, cost.per_token, cost.per_decode)
    for got, want in zip(fitted, true, strict=True):
        assert got == pytest.approx(want, rel=0.15)
    assert cost.fixed_tokens == pytest.approx(6.0, rel=0.25)


def test_step_cost_keeps_its_prior_where_steps_say_nothing() -> None:
    """Only decode steps of one size: the per-token cost cannot be told from them and stays near the prior;
    times that are not positive finite numbers are ignored."""
    cost = StepCost()
    for _ in range(200):
        cost.observe(0, 16, 0.011)
    assert cost.per_token == pytest.approx(PRIOR[1], rel=0.05)
    assert cost.fixed + 16 * cost.per_decode == pytest.approx(0.011, rel=0.02)
    before = (cost.fixed, cost.per_token, cost.per_decode)
    for bad in (0.0, -1.0, math.nan, math.inf):
        cost.observe(100, 0, bad)
    assert (cost.fixed, cost.per_token, cost.per_decode) == before


@pytest.mark.parametrize(
    "shared,waiting,prompt,want",
    [
        (20, 16, 100, 1),  # a burst of 16 short prompts on a CPU: one at a time
        (20, 64, 100, 3),  # 64 of them: floor(sqrt(12.8))
        (20, 64, 5, 16),  # tiny prompts: many per step
        (2000, 64, 100, 35),  # a GPU-like fixed cost: floor(sqrt(1280))
        (2000, 8, 100, 8),  # never more than are waiting
        (1, 3, 4000, 1),  # long prompts: at least one
        (20, 0, 100, 0),
    ],
)
def test_prompts_to_start(shared: float, waiting: int, prompt: float, want: int) -> None:
    assert prompts_to_start(shared, waiting, prompt) == want


def _first_steps(s: Scheduler, n: int) -> list[int]:
    """New prompts started in each of the first ``n`` steps."""
    return [len(run_step(s)[0].scheduled_new_reqs) for _ in range(n)]


def test_a_burst_is_started_in_small_steps_and_a_budget_fills_up() -> None:
    """16 prompts of 100 tokens arrive at once. With the prior cost (a fixed part of 20 tokens) the adaptive
    scheduler starts them one at a time, and more per step as the queue is longer; ``budget`` starts as many
    as 512 tokens hold."""
    adaptive, budget = _sched("adaptive"), _sched("budget")
    for s in (adaptive, budget):
        for i in range(16):
            s.add_request(req(f"r{i}", n_prompt=100, max_tokens=50))
    assert _first_steps(adaptive, 4) == [1, 1, 1, 1]
    assert _first_steps(budget, 1) == [6]  # 5 whole prompts and a chunk of the sixth
    long_queue = _sched("adaptive")
    for i in range(64):
        long_queue.add_request(req(f"r{i}", n_prompt=100, max_tokens=50))
    assert _first_steps(long_queue, 1) == [3]


def test_measured_steps_change_the_batch() -> None:
    """After timing steps whose fixed part is large against a token (a GPU-like engine), a burst goes in one
    step, up to the token budget; a prefill chunk already in the step counts as shared cost too."""
    s = _sched("adaptive", budget=4096)
    for i in range(100):
        prefill, decodes = (i % 5) * 256, (i % 7) * 8
        s.step_cost.observe(prefill, decodes, 0.010 + 1e-6 * prefill + 2e-6 * decodes)
    assert s.step_cost.fixed_tokens == pytest.approx(10_000, rel=0.1)
    for i in range(16):
        s.add_request(req(f"r{i}", n_prompt=100, max_tokens=50))
    assert _first_steps(s, 1) == [16]


def test_record_step_time_feeds_the_fit() -> None:
    """Steps as the engine core reports them: prompts (100 tokens) that take 10x the prior's time per token."""
    s = _sched("adaptive")
    for i in range(8):
        s.add_request(req(f"r{i}", n_prompt=100, max_tokens=4))
    while s.has_unfinished_requests():
        out = s.schedule()
        prefill = sum(n for n in out.num_scheduled_tokens.values() if n > 1)
        decodes = sum(1 for n in out.num_scheduled_tokens.values() if n == 1)
        ids = list(out.num_scheduled_tokens)
        s.update_from_output(out, ModelRunnerOutput(ids, [[7] for _ in ids]))
        s.record_step_time(out, PRIOR[0] + 10 * PRIOR[1] * prefill + PRIOR[2] * decodes)
    assert s.step_cost.per_token == pytest.approx(10 * PRIOR[1], rel=0.15)  # from 8 prefill steps


def test_prefill_batching_is_checked() -> None:
    with pytest.raises(ValueError, match="prefill_batching must be one of auto, adaptive, budget"):
        SchedulerConfig(prefill_batching="greedy")
    assert SchedulerConfig().prefill_batching == "auto"  # adaptive in the scheduler, see below


def test_auto_is_adaptive_in_the_scheduler() -> None:
    auto = _sched("auto")
    for i in range(16):
        auto.add_request(req(f"r{i}", n_prompt=100, max_tokens=50))
    assert _first_steps(auto, 2) == [1, 1]
