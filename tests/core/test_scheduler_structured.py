"""The scheduler with structured outputs, on exact state: a request waits for its grammar while others run,
keeps its place, gets bitmask rows only on steps where it samples (not on partial prefill chunks), ends
when its grammar does, survives preemption with its matcher, and a grammar that fails to compile is a
per-request error. A scripted backend stands in for xgrammar: its grammar is a fixed token sequence."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_scheduler import make_sched, req

from tidellm.core.request import RequestStatus
from tidellm.core.sched.output import ModelRunnerOutput
from tidellm.sample.params import StructuredOutputsParams
from tidellm.structured_output.backend import Matcher, StructuredOutputBackend
from tidellm.structured_output.manager import StructuredOutputManager
from tidellm.structured_output.spec import StructuredOutputError

VOCAB = 64


class ScriptMatcher(Matcher):
    def __init__(self, seq: list[int]) -> None:
        self.seq, self.pos = seq, 0

    def accept_tokens(self, token_ids):
        for t in token_ids:
            if self.pos >= len(self.seq) or self.seq[self.pos] != t:
                return False
            self.pos += 1
        return True

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        t = self.seq[self.pos]
        bitmask[row, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))

    def is_terminated(self):
        return self.pos == len(self.seq)

    def rollback(self, num_tokens):
        self.pos -= num_tokens


class ScriptBackend(StructuredOutputBackend):
    """regex "5 9 2" = exactly the tokens 5, 9, 2; "fail" does not compile; compiles wait for ``gate``."""

    gate = threading.Event()

    @classmethod
    def validate(cls, spec):
        pass

    def compile(self, spec):
        assert self.gate.wait(10)
        if spec.text == "fail":
            raise StructuredOutputError("Invalid regex: scripted failure.")
        return [int(t) for t in spec.text.split()]

    def matcher(self, compiled):
        return ScriptMatcher(compiled)


@pytest.fixture
def sched(monkeypatch):
    monkeypatch.setattr("tidellm.structured_output.manager.backend_class", lambda name: ScriptBackend)
    ScriptBackend.gate = threading.Event()
    s = make_sched(budget=8)
    s.structured_output = StructuredOutputManager(tokenizer=None, vocab_size=VOCAB, max_workers=1)
    yield s
    ScriptBackend.gate.set()
    s.structured_output.shutdown()


def constrained(rid, seq: str, **kw):
    return req(rid, structured_outputs=StructuredOutputsParams(regex=seq), **kw)


def step(s):
    """Schedule, then 'sample' like the runner: the first allowed token of a grammar row, else token 7."""
    out = s.schedule()
    ids = list(out.num_scheduled_tokens)
    rows = {}
    if out.grammar is not None:
        bits = np.unpackbits(out.grammar.bitmask.view(np.uint8), axis=1, bitorder="little")
        rows = {rid: int(np.flatnonzero(bits[i])[0]) for i, rid in enumerate(out.grammar.req_ids)}
    sampled = [
        [rows.get(r, 7)] if s.requests[r].num_computed_tokens >= s.requests[r].num_tokens else [] for r in ids
    ]
    return out, s.update_from_output(out, ModelRunnerOutput(ids, sampled))


def test_waits_for_its_grammar_while_others_run_and_keeps_its_place(sched):
    sched.add_request(constrained("g", "5 9 2", n_prompt=4, max_tokens=8))
    sched.add_request(req("p", n_prompt=4, max_tokens=2))
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["p"] and out.grammar is None
    assert [r.request_id for r in sched.waiting] == ["g"]
    sched.add_request(req("q", n_prompt=4, max_tokens=1))
    ScriptBackend.gate.set()
    sched.structured_output.wait_for_pending(10)
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["p", "g", "q"]  # g before q, its arrival order
    assert out.grammar.req_ids == ["g"]


def test_rows_only_when_sampling_and_the_grammar_ends_the_request(sched):
    ScriptBackend.gate.set()
    sched.add_request(constrained("g", "5 9 2", n_prompt=20, max_tokens=10))
    sched.add_request(req("p", n_prompt=4, max_tokens=10))
    sched.structured_output.wait_for_pending(10)
    grammar_rows, tokens, finish = [], [], None
    while sched.has_unfinished_requests() and finish is None:
        out, outs = step(sched)
        grammar_rows.append(out.grammar.req_ids if out.grammar else [])
        for o in outs:
            if o.request_id == "g":
                tokens += o.new_token_ids
                finish = o.finish_reason
    # prompt of 20 in chunks of 8: no rows while the prompt is partial, one per sampling step after
    assert grammar_rows == [[], [], ["g"], ["g"], ["g"]]
    assert tokens == [5, 9, 2] and finish == "stop"  # the grammar ended it, well before max_tokens
    assert "g" not in sched.structured_output and "p" in sched.requests


def test_grammar_ends_on_a_non_eos_token_too(sched):
    ScriptBackend.gate.set()
    sched.add_request(constrained("g", "5 9", n_prompt=4, max_tokens=10))
    sched.structured_output.wait_for_pending(10)
    tokens = []
    while sched.has_unfinished_requests():
        _, outs = step(sched)
        tokens += outs[0].new_token_ids
    assert tokens == [5, 9] and outs[0].finish_reason == "stop"


def test_compile_failure_is_a_request_error_not_an_engine_error(sched):
    ScriptBackend.gate.set()
    sched.add_request(constrained("bad", "fail", n_prompt=4))
    sched.add_request(req("ok", n_prompt=4, max_tokens=1))
    sched.structured_output.wait_for_pending(10)
    out, outs = step(sched)
    assert list(out.num_scheduled_tokens) == ["ok"]
    err = [o for o in outs if o.request_id == "bad"]
    assert (
        len(err) == 1
        and err[0].error == "Invalid regex: scripted failure."
        and err[0].finish_reason == "abort"
    )
    assert "bad" not in sched.requests and "bad" not in sched.structured_output
    assert not sched.has_unfinished_requests()
    assert sched.kv.pool.num_free_blocks == 64


def test_abort_frees_the_matcher_even_while_compiling(sched):
    sched.add_request(constrained("g", "5 9 2"))
    sched.finish_requests(["g"], RequestStatus.FINISHED_ABORTED)
    assert "g" not in sched.structured_output and not sched.has_unfinished_requests()
    ScriptBackend.gate.set()
    sched.add_request(constrained("h", "5 9 2", max_tokens=8))
    sched.structured_output.wait_for_pending(10)
    step(sched)
    sched.finish_requests(["h"], RequestStatus.FINISHED_ABORTED)
    assert "h" not in sched.structured_output


def test_preempted_request_keeps_its_matcher(monkeypatch):
    monkeypatch.setattr("tidellm.structured_output.manager.backend_class", lambda name: ScriptBackend)
    ScriptBackend.gate = threading.Event()
    ScriptBackend.gate.set()
    s = make_sched(num_blocks=6, budget=32)  # 24 slots of 4: two 8-token prompts growing must collide
    s.structured_output = StructuredOutputManager(tokenizer=None, vocab_size=VOCAB, max_workers=1)
    try:
        s.add_request(req("p", n_prompt=8, max_tokens=12))
        s.add_request(constrained("g", "5 9 11 13 17 19 23 29 2", n_prompt=8, max_tokens=12))
        s.structured_output.wait_for_pending(10)
        tokens = []
        while s.has_unfinished_requests():
            _, outs = step(s)
            tokens += [t for o in outs if o.request_id == "g" for t in o.new_token_ids]
        assert s.num_preemptions > 0
        assert tokens == [5, 9, 11, 13, 17, 19, 23, 29, 2]  # resumed where it stopped, nothing re-accepted
    finally:
        s.structured_output.shutdown()
