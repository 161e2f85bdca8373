"""The scheduler: one counter model for prefill, chunked prefill, decode, prefix hits and resumption.

Each step hands every request ``min(num_tokens - num_computed_tokens, budget left, chunk cap)`` tokens,
running requests first (preempting the lowest-priority runner by recompute when blocks run out), then
waiting requests with their prefix-cache hit subtracted: as many as the budget holds (``prefill_batching
budget``, the offline LLM's choice), or as many as gets them their first tokens soonest (``adaptive``, the
server's; ``admission.py``). There is no prefill/decode phase flag.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

from tidellm.config import CacheConfig, SchedulerConfig
from tidellm.core.kv_cache.manager import KVCacheManager
from tidellm.core.request import Request, RequestStatus
from tidellm.core.sched.admission import StepCost, prompts_to_start
from tidellm.core.sched.output import (
    CachedRequestData,
    GrammarBitmask,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from tidellm.core.sched.queue import make_queue
from tidellm.engine.protocol import EngineCoreOutput, SchedulerStats
from tidellm.structured_output.spec import StructuredOutputError

if TYPE_CHECKING:
    from tidellm.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        # group_windows: the sliding window (None: full attention) of each KV-cache group (see KVCacheManager).
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, group_windows
        )
        self.requests: dict[str, Request] = {}
        self.waiting = make_queue(scheduler_config.policy)
        self.running: list[Request] = []
        # Ids the runner must forget at the next step.
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        self.num_preemptions = 0
        # Grammars and matchers of requests with structured outputs (set by the engine core for generating
        # models); a request waits in the queue until its grammar is compiled.
        self.structured_output: StructuredOutputManager | None = None
        self._failed: list[EngineCoreOutput] = []  # requests ended by an error, reported at the next output
        self._errors: dict[str, str] = {}  # request id -> error, for a request finishing this step
        self.step_cost = StepCost()  # fitted from record_step_time; sizes each step's new prompts

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: Request) -> None:
        if request.sampling_params.structured_outputs is not None:
            if self.structured_output is None:
                raise ValueError("This engine does not support structured outputs (not a generating model).")
            # Starts compiling the grammar; a malformed spec raises here, before anything is queued.
            self.structured_output.add(request.request_id, request.sampling_params.structured_outputs)
        request.block_size = self.block_size
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop on a front-end stop string) requests; unknown ids are ignored."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)
            done.append(req)
        return done

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        if self.structured_output is not None:
            self.structured_output.free(req.request_id)
        self._finished_ids.add(req.request_id)
        del self.requests[req.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(len(self.waiting))

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    # ------------------------------------------------------------------ schedule
    def _chunk(self, req: Request, num_new: int, budget: int) -> int:
        cap = self.config.long_prefill_token_threshold
        if cap > 0:
            num_new = min(num_new, cap)
        return min(num_new, budget)

    def _preempt_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running)
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_ids.add(req.request_id)
        self.waiting.add_preempted(req)
        logger.debug("preempted %s", req.request_id)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        preempted_now = False

        # 1) running requests, in order; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req, req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while True:
                new_blocks = self.kv.allocate_slots(req, num_new)
                if new_blocks is not None:
                    break
                victim = self._preempt_victim()
                if victim.request_id in num_scheduled:  # priority policy: undo its slot in this step
                    budget += num_scheduled.pop(victim.request_id)
                    victim.num_computed_tokens = 0
                    cached_reqs = [c for c in cached_reqs if c.req_id != victim.request_id]
                if self.running.index(victim) < i:
                    i -= 1
                self._preempt(victim)
                preempted_now = True
                if victim is req:
                    break
            if new_blocks is None:  # req was itself the victim; the next runner now sits at index i
                continue
            num_scheduled[req.request_id] = num_new
            cached_reqs.append(
                CachedRequestData(
                    req.request_id, [[b.block_id for b in g] for g in new_blocks], req.num_computed_tokens
                )
            )
            budget -= num_new
            i += 1

        # 2) waiting requests, unless this step already had to preempt. Those whose grammar is still being
        # compiled are passed over (and put back in order), so they never hold up the requests behind them.
        skipped: list[Request] = []
        limit = self._prompts_to_start(num_scheduled)
        while (
            len(new_reqs) < limit
            and not preempted_now
            and len(self.waiting)
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting.peek()
            if self.structured_output is not None and not self._grammar_ready(req):
                self.waiting.pop()
                if not req.is_finished():
                    skipped.append(req)
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            num_new = self._chunk(req, req.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(req, num_new, hit_blocks, num_hit)
            if new_blocks is None:
                break
            self.waiting.pop()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                req.first_scheduled_time = time.time()
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.kv.record_prefix_query(req.num_tokens, num_hit)
            num_scheduled[req.request_id] = num_new
            new_reqs.append(
                NewRequestData(
                    req_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    sampling_params=req.sampling_params,
                    block_ids=self.kv.get_block_ids(req.request_id),
                    num_computed_tokens=num_hit,
                    eos_token_ids=req.eos_token_ids,
                )
            )
            budget -= num_new

        for req in reversed(skipped):
            self.waiting.add_preempted(req)  # back at the front, in their order

        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids,
            preempted_req_ids=self._preempted_ids,
        )
        self._finished_ids = set()
        self._preempted_ids = set()
        # Counters advance at schedule time; the runner's output only adds sampled tokens.
        for rid, n in num_scheduled.items():
            self.requests[rid].num_computed_tokens += n
        if self.structured_output is not None:
            out.grammar = self._grammar_bitmask(num_scheduled)
        return out

    def _prompts_to_start(self, num_scheduled: dict[str, int]) -> int:
        """How many waiting requests this step may start, on top of the running rows in ``num_scheduled``."""
        num_waiting = len(self.waiting)
        if self.config.prefill_batching == "budget" or not num_waiting:
            return num_waiting
        # The next to start: the mean of what is left of their prompts.
        head = list(itertools.islice(self.waiting, 64))
        mean = sum(r.num_tokens - r.num_computed_tokens for r in head) / len(head)
        # What the new prompts share: the step's fixed cost and the prefill chunks already in it (not its
        # decode rows: see admission.py).
        prefill, _ = _prefill_and_decodes(num_scheduled)
        return prompts_to_start(self.step_cost.fixed_tokens + prefill, num_waiting, mean)

    def record_step_time(self, sched_out: SchedulerOutput, seconds: float) -> None:
        """The measured time of a step (scheduling, model, outputs): what ``StepCost`` learns from."""
        if not sched_out.is_empty:
            self.step_cost.observe(*_prefill_and_decodes(sched_out.num_scheduled_tokens), seconds)

    # ------------------------------------------------------------------ structured outputs
    def _grammar_ready(self, req: Request) -> bool:
        """True unless ``req`` still waits for its grammar; a grammar that failed to compile finishes the
        request with the compile error (a per-request error, never an engine crash)."""
        so = self.structured_output
        if so is None or req.request_id not in so:
            return True
        try:
            return so.ready(req.request_id)
        except StructuredOutputError as e:
            logger.info("Request %s: %s", req.request_id, e)
            req.status = RequestStatus.FINISHED_ABORTED
            self._failed.append(EngineCoreOutput(req.request_id, [], finish_reason="abort", error=str(e)))
            self._free(req)
            return False

    def _grammar_bitmask(self, num_scheduled: dict[str, int]) -> GrammarBitmask | None:
        """Bitmask rows of the constrained requests that sample this step (not those mid-prefill)."""
        so = self.structured_output
        assert so is not None
        ids = [
            rid
            for rid in num_scheduled
            if rid in so and self.requests[rid].num_computed_tokens >= self.requests[rid].num_tokens
        ]
        return GrammarBitmask(ids, so.grammar_bitmask(ids)) if ids else None

    def _advance_grammar(self, req: Request, new_ids: list[int]) -> None:
        """Feed the sampled tokens to the request's matcher; a finished grammar finishes the request."""
        so = self.structured_output
        assert so is not None
        rid = req.request_id
        if not so.accept(rid, new_ids):
            # The bitmask only allowed grammar tokens, so this is a bug: fail the request, never the engine.
            logger.error("Request %s: the grammar rejected sampled tokens %s", rid, new_ids)
            req.status = RequestStatus.FINISHED_ABORTED
            self._errors[rid] = f"Internal error: the output left its grammar at token {new_ids[-1]}."
        elif not req.is_finished() and so.is_terminated(rid):
            req.status = RequestStatus.FINISHED_STOPPED

    # ------------------------------------------------------------------ results
    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs, self._failed = self._failed, []
        for row, rid in enumerate(runner_out.req_ids):
            req = self.requests.get(rid)
            new_ids = runner_out.sampled_token_ids[row]
            if req is None or not new_ids:
                continue
            req.append_output_token_ids(new_ids)
            self._check_stop(req)
            if self.structured_output is not None and rid in self.structured_output:
                self._advance_grammar(req, new_ids)
            out = EngineCoreOutput(
                request_id=rid,
                new_token_ids=new_ids,
                new_logprobs=[runner_out.logprobs[rid]] if rid in runner_out.logprobs else None,
                prompt_logprobs=runner_out.prompt_logprobs.get(rid),
                finish_reason=req.get_finish_reason(),
                stop_reason=req.stop_reason,
                num_cached_tokens=max(req.num_cached_tokens, 0),
                # With the first token only: the front end's queue-time metric.
                scheduled_time=req.first_scheduled_time if req.num_output_tokens == len(new_ids) else None,
                error=self._errors.pop(rid, None),
            )
            if req.is_finished():
                self.running.remove(req)
                self._free(req)
            outputs.append(out)
        return outputs

    def _check_stop(self, req: Request) -> None:
        token = req.output_token_ids[-1]
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return
            if params.stop_token_ids and token in params.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token
                return
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH

    # ------------------------------------------------------------------ stats
    def make_stats(self) -> SchedulerStats:
        s = self.kv.stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=s.queries,
            prefix_cache_hits=s.hits,
            num_preemptions=self.num_preemptions,
            num_kv_blocks=self.kv.num_blocks,
        )


def _prefill_and_decodes(num_scheduled: dict[str, int]) -> tuple[int, int]:
    """(prompt tokens, one-token rows) of a step: its prefill and decode parts."""
    ones = sum(1 for n in num_scheduled.values() if n == 1)
    return sum(num_scheduled.values()) - ones, ones
