"""Front-end side of a request's output: detokenize, apply stop strings, build logprobs and outputs.

Runs in the process that talks to users (the offline ``LLM`` or the API server), never in the engine core.
A request with ``n > 1`` is fanned out into ``n`` child requests in the core; their outputs are gathered
back under the parent here.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tidellm.engine.detokenizer import IncrementalDetokenizer
from tidellm.engine.protocol import EngineCoreOutput, LogprobEntry
from tidellm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from tidellm.sample.params import SamplingParams
from tidellm.tokenizer.tokenizer import Tokenizer


class OutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output when the request finishes (offline batch)


@dataclass
class ParentRequest:
    """Gathers the ``n`` children of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: OutputKind
    metrics: RequestMetrics
    children: dict[int, ChildState] = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


@dataclass
class ChildState:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}-{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self._child_to_parent: dict[str, tuple[ParentRequest, int]] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        child_params: list[SamplingParams],
        kind: OutputKind,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Register a user request and return the ids of its children in the engine core."""
        parent = ParentRequest(
            request_id, prompt, prompt_token_ids, kind, RequestMetrics(arrival_time or time.time())
        )
        n = len(child_params)
        ids = []
        for i, p in enumerate(child_params):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=p.skip_special_tokens,
                spaces_between_special_tokens=p.spaces_between_special_tokens,
                stop=p.stop or [],
                include_stop_str_in_output=p.include_stop_str_in_output,
            )
            child = ChildState(
                i, p, detok, [] if p.logprobs is not None else None, 0.0 if p.logprobs is not None else None
            )
            parent.children[i] = child
            cid = child_request_id(request_id, i, n)
            self._child_to_parent[cid] = (parent, i)
            ids.append(cid)
        self.parents[request_id] = parent
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        return [child_request_id(request_id, i, len(parent.children)) for i in parent.children]

    def abort(self, request_id: str) -> None:
        for cid in self.child_ids(request_id):
            self._child_to_parent.pop(cid, None)
        self.parents.pop(request_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the user-facing outputs to emit and child ids the core must abort (stop strings)."""
        now = time.time()
        touched: dict[str, ParentRequest] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._child_to_parent.get(out.request_id)
            if entry is None:
                continue
            parent, idx = entry
            child = parent.children[idx]
            m = parent.metrics
            if m.first_token_time is None and out.new_token_ids:
                m.first_token_time = now
            m.last_token_time = now
            m.num_generation_tokens += len(out.new_token_ids)
            if out.prompt_logprobs is not None:
                parent.prompt_logprobs = [None, *(self._to_logprob_dict(e) for e in out.prompt_logprobs)]
            parent.num_cached_tokens = out.num_cached_tokens
            self._apply(child, out, to_abort)
            touched[parent.request_id] = parent

        results = []
        for parent in touched.values():
            if parent.finished:
                parent.metrics.finished_time = now
                for i in parent.children:
                    self._child_to_parent.pop(
                        child_request_id(parent.request_id, i, len(parent.children)), None
                    )
                del self.parents[parent.request_id]
            ro = self._make_output(parent)
            if ro is not None:
                results.append(ro)
        return results, to_abort

    def _apply(self, child: ChildState, out: EngineCoreOutput, to_abort: list[str]) -> None:
        if child.finish_reason is not None:
            return
        stop_str = child.detok.update(out.new_token_ids, stop_terminated=out.finish_reason == "stop")
        if child.logprobs is not None and out.new_logprobs:
            for entry in out.new_logprobs:
                child.logprobs.append(self._to_logprob_dict(entry))
                child.cumulative_logprob += entry[1][0]
        if stop_str is not None:
            child.finish_reason, child.stop_reason = "stop", stop_str
            if out.finish_reason is None:
                to_abort.append(out.request_id)
            # Drop logprobs of tokens cut off with the stop string.
            if child.logprobs is not None:
                del child.logprobs[len(child.detok.output_token_ids) :]
        elif out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason

    def _to_logprob_dict(self, entry: LogprobEntry) -> dict[int, Logprob]:
        ids, lps, rank = entry
        decode = self.tokenizer.decode
        d: dict[int, Logprob] = {ids[0]: Logprob(lps[0], rank, decode([ids[0]], skip_special_tokens=False))}
        for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:], strict=True), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, r, decode([tid], skip_special_tokens=False))
        return d

    def _make_output(self, parent: ParentRequest) -> RequestOutput | None:
        finished = parent.finished
        if parent.kind is OutputKind.FINAL_ONLY and not finished:
            return None
        delta = parent.kind is OutputKind.DELTA
        completions = []
        for child in parent.children.values():
            done = child.finish_reason is not None
            ids = child.detok.output_token_ids
            text = child.detok.get_next_output_text(done, delta)
            new_ids = ids[child.sent_tokens :] if delta else list(ids)
            lps = child.logprobs
            if delta and lps is not None:
                lps = lps[child.sent_tokens :]
            if delta and not text and not new_ids and not done:
                continue
            child.sent_tokens = len(ids)
            completions.append(
                CompletionOutput(
                    index=child.index,
                    text=text,
                    token_ids=new_ids,
                    cumulative_logprob=child.cumulative_logprob,
                    logprobs=lps,
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                )
            )
        if delta and not completions:
            return None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics,
        )
