"""The xgrammar backend on the real SmolLM2 vocabulary: bitmasks, matchers, end of grammar, padded vocabulary,
special tokens, rollback, and the manager's compile pool and cache."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tidellm.sample.params import StructuredOutputsParams
from tidellm.structured_output.backend import allocate_bitmask, bitmask_width
from tidellm.structured_output.manager import StructuredOutputManager
from tidellm.structured_output.spec import GrammarSpec, StructuredOutputError, grammar_spec
from tidellm.structured_output.xgrammar_backend import XGrammarBackend

PAD = 64  # model vocabulary rows beyond the tokenizer's (as in checkpoints padded to a multiple of 64)


@pytest.fixture(scope="module")
def backend(smollm2_tokenizer) -> XGrammarBackend:
    return XGrammarBackend(smollm2_tokenizer, smollm2_tokenizer.vocab_size + PAD)


def allowed(matcher, vocab_size: int) -> np.ndarray:
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[0, :vocab_size].astype(bool)


def spec(**kwargs) -> GrammarSpec:
    return grammar_spec(StructuredOutputsParams(**kwargs))


def test_json_schema_walk_to_the_end(backend, smollm2_tokenizer):
    tok = smollm2_tokenizer
    v = backend.vocab_size
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    }
    m = backend.matcher(backend.compile(spec(json=schema, disable_any_whitespace=True)))
    first = allowed(m, v)
    assert first[tok.encode("{", add_special_tokens=False)[0]]
    assert not first[tok.encode("[", add_special_tokens=False)[0]]
    assert not first[list(tok.eos_token_ids)].any()  # no ending before the object is complete
    assert (
        not first[list(tok.all_special_ids)].any() and not first[tok.vocab_size :].any()
    )  # specials, padding
    assert m.accept_tokens(tok.encode('{"n": 7}', add_special_tokens=False)) and not m.is_terminated()
    end = allowed(m, v)
    assert set(np.flatnonzero(end)) == set(tok.eos_token_ids)  # complete: only an end-of-generation token
    assert m.accept_tokens([tok.eos_token_ids[0]]) and m.is_terminated()


def test_rejects_tokens_outside_the_grammar_and_rolls_back(backend, smollm2_tokenizer):
    tok = smollm2_tokenizer
    m = backend.matcher(backend.compile(spec(regex=r"[0-9]{2}-[a-z]+")))
    ids = tok.encode("12-ab", add_special_tokens=False)
    assert m.accept_tokens(ids[:1])
    before = allowed(m, backend.vocab_size)
    assert m.accept_tokens(ids[1:2])
    m.rollback(1)
    assert (allowed(m, backend.vocab_size) == before).all()
    fresh = backend.matcher(backend.compile(spec(regex=r"[0-9]{2}-[a-z]+")))
    assert not fresh.accept_tokens(tok.encode("x", add_special_tokens=False))


def test_choice_grammar_and_json_object(backend, smollm2_tokenizer):
    tok = smollm2_tokenizer
    choices = ['say "hi"', "new\nline", "ünï"]
    for text in choices:
        m = backend.matcher(backend.compile(spec(choice=choices)))
        assert m.accept_tokens(tok.encode(text, add_special_tokens=False)), text
        assert set(np.flatnonzero(allowed(m, backend.vocab_size))) == set(tok.eos_token_ids)
    m = backend.matcher(backend.compile(spec(json_object=True)))
    assert m.accept_tokens(tok.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False))
    m = backend.matcher(backend.compile(spec(json_object=True)))
    assert not m.accept_tokens(tok.encode("[1]", add_special_tokens=False))  # an object, not any JSON value


def test_bitmask_width_covers_the_padded_vocabulary(backend):
    assert bitmask_width(backend.vocab_size) * 32 >= backend.vocab_size
    assert allocate_bitmask(3, backend.vocab_size).shape == (3, bitmask_width(backend.vocab_size))


def test_compile_errors_are_structured_output_errors(backend):
    with pytest.raises(StructuredOutputError, match="Invalid regex"):
        backend.compile(GrammarSpec("regex", "("))
    with pytest.raises(StructuredOutputError, match="Invalid grammar"):
        backend.compile(GrammarSpec("grammar", "nonsense"))


# ------------------------------------------------------------------ the manager (engine core side)
def test_manager_compiles_off_thread_caches_and_frees(smollm2_tokenizer, monkeypatch):
    gate = threading.Event()
    compiles = []
    real_compile = XGrammarBackend.compile

    def slow_compile(self, s):
        compiles.append(s)
        gate.wait(10)
        return real_compile(self, s)

    monkeypatch.setattr(XGrammarBackend, "compile", slow_compile)
    mgr = StructuredOutputManager(smollm2_tokenizer, smollm2_tokenizer.vocab_size, max_workers=1)
    try:
        schema = {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}
        for rid in ("a", "b"):  # the same schema twice: one compile, two matchers
            mgr.add(rid, StructuredOutputsParams(json=json.dumps(schema)))
        assert not mgr.ready("a") and mgr.has_pending()
        gate.set()
        mgr.wait_for_pending(10)
        assert mgr.ready("a") and mgr.ready("b") and not mgr.has_pending()
        assert len(compiles) == 1 and mgr.num_compiles == 1
        rows = mgr.grammar_bitmask(["a", "b"])
        assert (rows[0] == rows[1]).all()
        assert mgr.accept("a", smollm2_tokenizer.encode("[", add_special_tokens=False))
        assert not (mgr.grammar_bitmask(["a", "b"])[0] == rows[1]).all()  # each request its own state
        mgr.free("a")
        assert "a" not in mgr and "b" in mgr
        mgr.add("c", StructuredOutputsParams(regex="("))
        mgr.wait_for_pending(10)
        with pytest.raises(StructuredOutputError, match="Invalid regex"):
            mgr.ready("c")
    finally:
        mgr.shutdown()
