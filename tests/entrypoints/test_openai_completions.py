"""`POST /v1/completions` through the official openai client against a real server."""

from __future__ import annotations

import math

import httpx
import pytest
from server_utils import MODEL

PROMPT = "The capital of France is"


def _stream_text(client, **kw) -> tuple[dict[int, str], dict[int, str | None], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    chunks = list(client.completions.create(model=MODEL, stream=True, **kw))
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


def test_greedy_non_streaming_and_usage(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == 5  # "The capital of France is" in SmolLM2's tokenizer
    assert r.usage.total_tokens == 17


def test_streamed_text_equals_non_streamed(client):
    kw = dict(prompt=PROMPT, max_tokens=24, temperature=0)
    full = client.completions.create(model=MODEL, **kw).choices[0]
    texts, reasons, chunks = _stream_text(client, **kw)
    assert texts[0] == full.text
    assert reasons[0] == full.finish_reason
    assert len(chunks) > 2  # really streamed, not one blob


def test_stream_include_usage(client):
    texts, _, chunks = _stream_text(
        client,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8 and last.usage.prompt_tokens == 5
    assert all(ch.usage is None for ch in chunks[:-1])


def test_list_of_prompts_and_token_ids(client, server, auth_headers):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=auth_headers).json()["tokens"]
    by_text = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    )
    r = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Hello, my name is"], max_tokens=6, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == by_text
    r_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r_ids.choices[0].text == by_text
    r_lists = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in r_lists.choices] == [by_text, by_text]
    assert r_lists.usage.prompt_tokens == 2 * len(ids)


def test_n_choices_with_seed(client):
    kw = dict(prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=1234, extra_body={"ignore_eos": True})
    a = client.completions.create(model=MODEL, **kw)
    b = client.completions.create(model=MODEL, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded → reproducible
    assert len({c.text for c in a.choices}) > 1  # children get different seeds
    assert a.usage.completion_tokens == 18
    texts, reasons, _ = _stream_text(client, **kw)
    assert set(texts) == {0, 1, 2} and set(reasons.values()) == {"length"}


def test_stop_string(client):
    base = (
        client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    assert " 6" in base, base
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"]
    )
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == base[: base.index(" 6")]
    texts, reasons, _ = _stream_text(client, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=" 6")
    assert texts[0] == c.text and reasons[0] == "stop"
    inc = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        max_tokens=20,
        temperature=0,
        stop=[" 6"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert inc.choices[0].text == c.text + " 6"


def test_logprobs_legacy_format(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert tlp <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), tlp, abs_tol=1e-4)  # greedy: the chosen token is the best
        assert top[tok] == pytest.approx(tlp, abs=1e-5)
    texts, _, chunks = _stream_text(client, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    streamed_tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for ch in chunks for c in ch.choices if c.logprobs for o in c.logprobs.text_offset]
    assert streamed_tokens == lp.tokens and offsets == lp.text_offset


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == r.choices[0].text
    texts, _, _ = _stream_text(client, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert texts[0] == PROMPT + plain.choices[0].text


def test_sampling_extras_accepted(client):
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"28": -100},
        user="tester",
        seed=7,
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 4,
            "stop_token_ids": [2],
            "skip_special_tokens": False,
            "priority": 0,
        },
    )
    assert r.usage.completion_tokens >= 4


def test_ignore_eos_and_max_tokens(client):
    r = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
