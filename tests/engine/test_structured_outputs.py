"""Structured outputs offline with the real SmolLM2: every reply to 13 JSON schemas parses and validates
(greedy, sampled, compact), choices / regexes / EBNF grammars / json_object are respected, unconstrained
neighbours in the batch are unchanged, n > 1, chunked prefill and preemption keep each matcher right, and
bad or failing constraints are errors that leave the engine serving."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest

from tidellm import LLM, SamplingParams
from tidellm.sample.params import StructuredOutputsParams as SO
from tidellm.structured_output.spec import StructuredOutputError
from tidellm.structured_output.xgrammar_backend import XGrammarBackend

sys.path.insert(0, str(Path(__file__).parents[1] / "structured_output"))
from schemas import SCHEMAS  # noqa: E402

MAX_TOKENS = 160  # every schema's reply ends well before (they are bounded; see schemas.py)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text + " Answer in JSON."}]


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_every_schema_greedy_sampled_and_compact(llm_fp32):
    convs, params, schemas = [], [], []
    for prompt, schema in SCHEMAS.values():
        for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}, {"temperature": 0, "compact": True}):
            kw = dict(kw)
            so = SO(json=schema, disable_any_whitespace=kw.pop("compact", False))
            convs.append(chat(prompt))
            params.append(SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=so, **kw))
            schemas.append(schema)
    outs = llm_fp32.chat(convs, params, use_tqdm=False)
    for out, schema, p in zip(outs, schemas, params, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, schema)
        check_json(c.text, schema)
        if p.structured_outputs.disable_any_whitespace:
            assert "\n" not in c.text


def test_unconstrained_neighbours_are_unchanged(llm_fp32):
    plain = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    plain_params = [SamplingParams(temperature=0, max_tokens=24)] * 2 + [
        SamplingParams(temperature=0.9, seed=42, max_tokens=24)
    ]
    alone = llm_fp32.generate(plain, plain_params, use_tqdm=False)
    tok = llm_fp32.get_tokenizer()
    constrained = [
        tok.apply_chat_template(chat(p), add_generation_prompt=True) for p, _ in list(SCHEMAS.values())[:4]
    ]
    constrained_params = [
        SamplingParams(temperature=0.7, seed=1, max_tokens=MAX_TOKENS, structured_outputs=SO(json=s))
        for _, s in list(SCHEMAS.values())[:4]
    ]
    prompts = [constrained[0], plain[0], constrained[1], plain[1], constrained[2], plain[2], constrained[3]]
    params = [constrained_params[0], plain_params[0], constrained_params[1], plain_params[1]]
    params += [constrained_params[2], plain_params[2], constrained_params[3]]
    mixed = llm_fp32.generate(prompts, params, use_tqdm=False)
    for a, m in zip(alone, [mixed[1], mixed[3], mixed[5]], strict=True):
        assert m.outputs[0].token_ids == a.outputs[0].token_ids
        assert m.outputs[0].text == a.outputs[0].text
    for i, (_, schema) in zip((0, 2, 4, 6), list(SCHEMAS.values())[:4], strict=True):
        check_json(mixed[i].outputs[0].text, schema)


def test_choice_regex_grammar_and_json_object(llm_fp32):
    choices = ["yes", "no", "it depends"]
    grammar = 'root ::= "The answer is " number "." \nnumber ::= [1-9] [0-9]? | "zero"'
    regex = r"\(\d{3}\) \d{3}-\d{4}"
    outs = llm_fp32.chat(
        [chat("Is water wet?"), chat("Give a phone number."), chat("What is 6 times 7?"), chat("A config.")],
        [
            SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, structured_outputs=SO(choice=choices)),
            SamplingParams(temperature=0, max_tokens=20, structured_outputs=SO(regex=regex)),
            SamplingParams(temperature=0.5, seed=2, max_tokens=20, structured_outputs=SO(grammar=grammar)),
            SamplingParams(temperature=0, max_tokens=48, structured_outputs=SO(json_object=True)),
        ],
        use_tqdm=False,
    )
    assert len(outs[0].outputs) == 3 and all(c.text in choices for c in outs[0].outputs)
    assert all(c.finish_reason == "stop" for c in outs[0].outputs)
    assert re.fullmatch(regex, outs[1].outputs[0].text)
    assert re.fullmatch(r"The answer is ([1-9][0-9]?|zero)\.", outs[2].outputs[0].text)
    c = outs[3].outputs[0]
    assert c.text.lstrip().startswith("{")  # an object, though 48 tokens may not close it
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)


def test_chunked_prefill_and_preemption_keep_each_matcher(llm_fp32):
    """A 30-block pool and 32-token steps: prompts arrive in chunks and requests get preempted; greedy
    constrained replies are the same as in the roomy engine."""
    items = list(SCHEMAS.values())[:8]
    convs = [chat(p + " Be precise and detailed, as in a formal report.") for p, _ in items]
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=SO(json=s)) for _, s in items
    ]
    small = LLM(
        "smollm2-135m",
        dtype="float32",
        max_model_len=400,
        kv_cache_memory_gb=30 * 16 * 46080 / 2**30,
        max_num_batched_tokens=32,
        enable_prefix_caching=False,
        log_level="WARNING",
    )
    # Compile (and cache) the grammars first: were some still compiling, their requests would start late,
    # after others finished, and the pool might never run short.
    warm = [SamplingParams(max_tokens=1, structured_outputs=p.structured_outputs) for p in params]
    small.chat(convs, warm, use_tqdm=False)
    outs = small.chat(convs, params, use_tqdm=False)
    assert small.engine.core.scheduler.num_preemptions > 0
    reference = llm_fp32.chat(convs, params, use_tqdm=False)
    for out, ref, (_, schema) in zip(outs, reference, items, strict=True):
        check_json(out.outputs[0].text, schema)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(small.engine.core.structured_output._requests) == 0  # every matcher freed


def test_bad_constraints_raise_and_the_engine_keeps_serving(llm_fp32, monkeypatch):
    ok = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="'uniqueItems' at #"):
        llm_fp32.generate(["a", "b"], [ok, SamplingParams(structured_outputs=SO(json={"uniqueItems": True}))])
    with pytest.raises(ValueError, match="Invalid regex"):
        llm_fp32.generate(["a"], SamplingParams(structured_outputs=SO(regex="[a-")), use_tqdm=False)

    # A failure inside the engine core (the front end's check passed): an error for that request only.
    def broken(self, spec):
        raise StructuredOutputError("Could not compile the regex constraint: scripted.")

    monkeypatch.setattr(XGrammarBackend, "compile", broken)
    so = SamplingParams(n=2, max_tokens=4, structured_outputs=SO(regex="never-compiled-[0-9]"))
    with pytest.raises(ValueError, match="scripted"):
        llm_fp32.generate(["a", "b"], [ok, so], use_tqdm=False)
    monkeypatch.undo()
    assert not llm_fp32.engine.has_unfinished_requests()
    out = llm_fp32.generate(["a"], SamplingParams(max_tokens=3, structured_outputs=SO(regex="[0-9]+")))
    assert out[0].outputs[0].text.isdigit()
